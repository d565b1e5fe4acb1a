package testenv

import (
	"sync"

	"github.com/meshca/meshca/internal/testenv/fixture"
)

// binDirEnv names the directory holding kube-apiserver and etcd; the Makefile
// exports it after running hack/testenv.sh.
const binDirEnv = "MESHCA_KUBE_BIN_DIR"

// binDir returns the directory holding kube-apiserver and etcd. It is located
// once per test binary: the script is cheap when its cache is warm, but
// parallel tests need not each run it.
var binDir = sync.OnceValues(func() (string, error) {
	return fixture.BinDir(binDirEnv, "hack/testenv.sh", []string{"-q"}, "kube-apiserver", "etcd")
})
