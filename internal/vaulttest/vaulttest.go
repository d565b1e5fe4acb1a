// Package vaulttest runs a real Vault server for tests of meshca's Vault
// keystore, so that they exercise Vault's own Transit, auth methods and
// policies rather than a fake that agrees with our assumptions.
//
// Each Start runs its own `vault server -dev`: in memory, unsealed, with TLS
// from a CA it generates, on a free loopback port, healthy in well under a
// second. It is stopped when the test ends.
//
// The binary is built from the version pinned in tools/vault by
// hack/vault.sh and cached outside the repository; `make test` builds it
// first and exports MESHCA_VAULT_BIN_DIR. Without that variable Start asks
// the script for the cached binary but never builds it (a cold build takes
// about 15 minutes, longer than go test waits). A missing binary fails the
// test: it never skips, because a skipped test looks exactly like a passing
// one in CI.
//
// Vault is BUSL-licensed: it is run as a test fixture only. Use this
// package only from tests.
package vaulttest

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
)

// binDirEnv names the directory holding the vault binary; the Makefile
// exports it after running hack/vault.sh.
const binDirEnv = "MESHCA_VAULT_BIN_DIR"

const modulePath = "github.com/meshca/meshca"

const (
	// readyTimeout bounds start-up: Vault is healthy in about 0.2 s on an
	// idle machine; the margin is for parallel test binaries on 2 cores.
	readyTimeout = time.Minute
	stopGrace    = 10 * time.Second
	logTailLines = 40
	// requestTimeout bounds each helper's call, so a wedged Vault fails the
	// test instead of hanging it.
	requestTimeout = 30 * time.Second
)

// ServerName is a name in the certificate of every Vault this package
// starts besides localhost and 127.0.0.1, for tests that connect by IP
// address and verify another name.
const ServerName = "vault.test"

// Options configure Start.
type Options struct {
	// TransitMount is where Start enables the Transit secrets engine;
	// default "transit".
	TransitMount string
}

// Vault is a running development Vault owned by one test.
type Vault struct {
	addr    string
	token   string
	dir     string
	caFile  string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed once Wait has returned
	waitErr error         // Wait's result, valid after done is closed
	client  *api.Client
}

// Start starts a Vault as Options{} would.
func Start(t testing.TB) *Vault {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith starts a development Vault with a random root token, waits
// until it is healthy, enables Transit and stops Vault when the test ends.
// It fails the test if the binary is missing or Vault does not come up,
// printing the end of its log.
func StartWith(t testing.TB, opts Options) *Vault {
	t.Helper()
	bin, err := binary()
	if err != nil {
		t.Fatalf("vaulttest: no vault binary: %v\nbuild it with: bash hack/vault.sh (or make testenv), about 15 minutes cold, then export %s=$(bash hack/vault.sh -q)", err, binDirEnv)
	}
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("vaulttest: %v", err)
	}
	v := &Vault{token: "root-" + hex.EncodeToString(b), dir: t.TempDir()}
	v.caFile = filepath.Join(v.dir, "vault-ca.pem")
	v.logPath = filepath.Join(v.dir, "vault.log")
	t.Cleanup(func() {
		v.stop()
		if t.Failed() {
			t.Logf("vaulttest: last lines of the vault log:\n%s", v.tail(logTailLines))
		}
	})
	begin := time.Now()
	if err := v.start(bin); err != nil {
		t.Fatalf("vaulttest: %v", err)
	}
	t.Logf("vaulttest: vault ready at %s in %v", v.addr, time.Since(begin).Round(time.Millisecond))
	v.EnableSecretsEngine(t, cmp.Or(opts.TransitMount, "transit"), "transit")
	return v
}

func (v *Vault) start(bin string) error {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		var port int
		if port, err = freePort(); err != nil {
			return err
		}
		v.addr = "https://127.0.0.1:" + strconv.Itoa(port)
		if err = v.startProcess(bin, port); err != nil {
			return err
		}
		if err = v.waitReady(); err == nil {
			return v.makeClient()
		}
		if !v.exited() || !strings.Contains(v.tail(logTailLines), "address already in use") {
			return err
		}
	}
	return err
}

func (v *Vault) startProcess(bin string, port int) error {
	f, err := os.OpenFile(v.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("vault log: %w", err)
	}
	fmt.Fprintf(f, "=== vaulttest: starting vault at %s\n", time.Now().Format(time.RFC3339Nano))
	v.cmd = exec.Command(bin, "server", "-dev",
		"-dev-listen-address=127.0.0.1:"+strconv.Itoa(port),
		"-dev-root-token-id="+v.token,
		// The token file would land in the user's home directory.
		"-dev-no-store-token",
		"-dev-tls",
		"-dev-tls-cert-dir="+v.dir,
		"-dev-tls-san="+ServerName,
	)
	v.cmd.Env = serverEnv()
	v.cmd.Stdout, v.cmd.Stderr = f, f
	v.cmd.SysProcAttr = sysProcAttr()
	if err := v.cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("starting vault: %w", err)
	}
	v.done = make(chan struct{})
	go func() {
		v.waitErr = v.cmd.Wait()
		f.Close()
		close(v.done)
	}()
	return nil
}

// serverEnv is the test's environment without VAULT_ variables, which
// would configure the server (and its CLI) behind the test's back.
func serverEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VAULT_") {
			env = append(env, kv)
		}
	}
	return env
}

// waitReady polls sys/health until Vault is initialised, unsealed and
// active. The CA file appears once Vault has generated its certificate.
func (v *Vault) waitReady() error {
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	var hc *http.Client
	for {
		err := errors.New("CA certificate not written yet")
		if hc == nil {
			hc, _ = v.httpClient()
		}
		if hc != nil {
			err = getOK(ctx, hc, v.addr+"/v1/sys/health")
		}
		if err == nil {
			return nil
		}
		select {
		case <-v.done:
			return fmt.Errorf("vault exited before it was healthy (%v); last check: %w", v.waitErr, err)
		case <-ctx.Done():
			return fmt.Errorf("vault not healthy after %v: %w", readyTimeout, err)
		case <-tick.C:
		}
	}
}

func (v *Vault) httpClient() (*http.Client, error) {
	pemData, err := os.ReadFile(v.caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemData) {
		return nil, fmt.Errorf("no certificates in %s", v.caFile)
	}
	return &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}, nil
}

func getOK(ctx context.Context, hc *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

func (v *Vault) makeClient() error {
	hc, err := v.httpClient()
	if err != nil {
		return err
	}
	// MaxRetries 0: a helper's failure should show at once, not after the
	// api's backoff.
	c, err := api.NewClient(&api.Config{Address: v.addr, HttpClient: hc, MaxRetries: 0, Timeout: requestTimeout})
	if err != nil {
		return fmt.Errorf("vault client: %w", err)
	}
	c.SetToken(v.token)
	c.ClearNamespace()
	v.client = c
	return nil
}

func (v *Vault) exited() bool {
	select {
	case <-v.done:
		return true
	default:
		return false
	}
}

func (v *Vault) stop() {
	if v.cmd == nil || v.done == nil || v.exited() {
		return
	}
	_ = v.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-v.done:
	case <-time.After(stopGrace):
		_ = v.cmd.Process.Kill()
		<-v.done
	}
}

// tail returns the last n lines of Vault's log.
func (v *Vault) tail(n int) string {
	data, err := os.ReadFile(v.logPath)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", v.logPath, err)
	}
	lines := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// Addr returns Vault's URL, https://127.0.0.1:<port>.
func (v *Vault) Addr() string { return v.addr }

// CAFile returns the PEM file of the CA that signed Vault's certificate,
// which names localhost, 127.0.0.1 and ServerName.
func (v *Vault) CAFile() string { return v.caFile }

// RootToken returns the root token.
func (v *Vault) RootToken() string { return v.token }

// Client returns an api client holding the root token. Callers must not
// change its token or namespace; use Clone for that.
func (v *Vault) Client() *api.Client { return v.client }

// freePort returns a loopback port that was free a moment ago. Another
// process may take it before Vault binds; start retries on that.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer l.Close()
	addr, ok := l.Addr().(*net.TCPAddr)
	if !ok {
		return 0, errors.New("free port: not a TCP address")
	}
	return addr.Port, nil
}

// The binary is located once per test binary.
var (
	binOnce sync.Once
	binPath string
	binErr  error
)

func binary() (string, error) {
	binOnce.Do(func() { binPath, binErr = locateBinary() })
	return binPath, binErr
}

func locateBinary() (string, error) {
	if dir := os.Getenv(binDirEnv); dir != "" {
		bin := filepath.Join(dir, "vault")
		if err := checkExecutable(bin); err != nil {
			return "", fmt.Errorf("%s=%s: %w", binDirEnv, dir, err)
		}
		return bin, nil
	}
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	// The script owns the cache layout (its directory name hashes the
	// pins), so it is asked rather than the layout re-derived here; -n
	// keeps it from starting a build.
	script := filepath.Join(root, "hack", "vault.sh")
	cmd := exec.Command("bash", script, "-q", "-n")
	cmd.Dir = root
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s -q -n: %w: %s", script, err, strings.TrimSpace(stderr.String()))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	bin := filepath.Join(lines[len(lines)-1], "vault")
	if err := checkExecutable(bin); err != nil {
		return "", fmt.Errorf("%s printed %q: %w", script, lines[len(lines)-1], err)
	}
	return bin, nil
}

func checkExecutable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not executable", path)
	}
	return nil
}

// moduleRoot finds meshca's go.mod above the working directory, which go
// test sets to the package under test.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && isModule(string(data), modulePath) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no go.mod for %s above the working directory; set %s", modulePath, binDirEnv)
		}
		dir = parent
	}
}

func isModule(gomod, path string) bool {
	for _, line := range strings.Split(gomod, "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`) == path
		}
	}
	return false
}
