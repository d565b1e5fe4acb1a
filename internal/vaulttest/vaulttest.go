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
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/meshca/meshca/internal/testenv/fixture"
)

// binDirEnv names the directory holding the vault binary; the Makefile
// exports it after running hack/vault.sh.
const binDirEnv = "MESHCA_VAULT_BIN_DIR"

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
	proc    *fixture.Process
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
	dir, err := binDir()
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
		if v.proc == nil {
			return
		}
		v.proc.Stop(stopGrace)
		if t.Failed() {
			t.Logf("vaulttest: last lines of the vault log:\n%s", v.proc.Tail(logTailLines))
		}
	})
	begin := time.Now()
	if err := v.start(filepath.Join(dir, "vault")); err != nil {
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
		if port, err = fixture.FreePort(); err != nil {
			return err
		}
		v.addr = "https://127.0.0.1:" + strconv.Itoa(port)
		var p *fixture.Process
		if p, err = v.startProcess(bin, port); err != nil {
			return err
		}
		v.proc = p
		if err = v.proc.WaitReady(readyTimeout, healthCheck(v.caFile, v.addr)); err == nil {
			return v.makeClient()
		}
		if !v.proc.Exited() || !v.proc.PortInUse() {
			return err
		}
	}
	return err
}

func (v *Vault) startProcess(bin string, port int) (*fixture.Process, error) {
	return fixture.Start("vault", v.logPath, serverEnv(), bin, "server", "-dev",
		"-dev-listen-address=127.0.0.1:"+strconv.Itoa(port),
		"-dev-root-token-id="+v.token,
		// The token file would land in the user's home directory.
		"-dev-no-store-token",
		"-dev-tls",
		"-dev-tls-cert-dir="+v.dir,
		"-dev-tls-san="+ServerName,
	)
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

// healthCheck returns a check that asks sys/health whether Vault is
// initialised, unsealed and active. The CA file appears once Vault has
// generated its certificate, so the client is built on the first check that
// finds it; each start generates a new CA, so each needs a new check.
func healthCheck(caFile, addr string) func(context.Context) error {
	var hc *http.Client
	return func(ctx context.Context) error {
		if hc == nil {
			var err error
			if hc, err = fixture.HTTPClient(caFile); err != nil {
				return fmt.Errorf("CA certificate not written yet: %w", err)
			}
		}
		return fixture.GetOK(ctx, hc, addr+"/v1/sys/health")
	}
}

func (v *Vault) makeClient() error {
	hc, err := fixture.HTTPClient(v.caFile)
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

// binDir returns the directory holding the vault binary, located once per
// test binary. -n keeps the script from starting a build.
var binDir = sync.OnceValues(func() (string, error) {
	return fixture.BinDir(binDirEnv, "hack/vault.sh", []string{"-q", "-n"}, "vault")
})
