package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// binDirEnv names the directory holding kube-apiserver and etcd; the Makefile
// exports it after running hack/testenv.sh.
const binDirEnv = "MESHCA_KUBE_BIN_DIR"

const modulePath = "github.com/meshca/meshca"

// The binaries are located once per test binary: the script is cheap when its
// cache is warm, but parallel tests need not each run it.
var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// binDir returns the directory holding kube-apiserver and etcd.
func binDir() (string, error) {
	binOnce.Do(func() { binPath, binErr = locateBinaries() })
	return binPath, binErr
}

func locateBinaries() (string, error) {
	if dir := os.Getenv(binDirEnv); dir != "" {
		if err := checkBinaries(dir); err != nil {
			return "", fmt.Errorf("%s=%s: %w; run hack/testenv.sh and export the directory it prints", binDirEnv, dir, err)
		}
		return dir, nil
	}
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	// The script is the single owner of the cache layout (its directory name
	// hashes the pins), so it is asked rather than the layout re-derived here.
	script := filepath.Join(root, "hack", "testenv.sh")
	cmd := exec.Command("bash", script, "-q")
	cmd.Dir = root
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s failed (run it by hand to see progress): %w\n%s", script, err, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	dir := lines[len(lines)-1]
	if err := checkBinaries(dir); err != nil {
		return "", fmt.Errorf("%s printed %q: %w", script, dir, err)
	}
	return dir, nil
}

func checkBinaries(dir string) error {
	for _, name := range []string{"kube-apiserver", "etcd"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return fmt.Errorf("missing %s: %w", name, err)
		}
		if fi.Mode()&0o111 == 0 {
			return fmt.Errorf("%s is not executable", filepath.Join(dir, name))
		}
	}
	return nil
}

// moduleRoot finds meshca's go.mod above the working directory, which go test
// sets to the package under test.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("testenv: %w", err)
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && isModule(data, modulePath) {
			return dir, nil
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("testenv: %w", err)
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("testenv: no go.mod for %s above the working directory; set %s", modulePath, binDirEnv)
		}
		dir = parent
	}
}

func isModule(gomod []byte, path string) bool {
	for _, line := range strings.Split(string(gomod), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`) == path
		}
	}
	return false
}
