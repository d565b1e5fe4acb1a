// Package vaulttest runs a real Vault server for tests of meshca's Vault
// keystore, so that they exercise Vault's own Transit, auth methods and
// policies rather than a fake that agrees with our assumptions.
//
// Each Start runs its own `vault server -dev`: in memory, unsealed, with TLS
// from a CA it generates, on a free loopback port, healthy in well under a
// second. It is stopped when the test ends.
//
// Options.Persistent runs `vault server -config` on file storage in the
// test's temporary directory instead, initialised with a single unseal key
// that the fixture keeps: Stop and Restart then model an outage that Vault
// survives with its keys, tokens and policies, on the same address and
// certificate, as a real deployment's clients see it.
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
	// Persistent keeps Vault's data on disk, so that Restart brings it
	// back after Stop. Start then initialises Vault itself, so the root
	// token is Vault's own rather than a chosen one, and nothing but
	// Transit is mounted (a development Vault also has kv-v2 at secret/).
	Persistent bool
}

// Vault is a running Vault owned by one test.
type Vault struct {
	port         int // on 127.0.0.1, the same across restarts
	token        string
	unsealKey    string // from sys/init; a development Vault has none
	persistent   bool
	transitMount string
	bin          string
	dir          string
	caFile       string
	logPath      string
	proc         *fixture.Process // the current run
	client       *api.Client
}

// Start starts a Vault as Options{} would.
func Start(t testing.TB) *Vault {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith starts a Vault as opts says, waits until it is healthy
// (initialised, unsealed and active), enables Transit and stops Vault when
// the test ends. A development Vault gets a random root token. It fails the
// test if the binary is missing or Vault does not come up, printing the end
// of its log.
func StartWith(t testing.TB, opts Options) *Vault {
	t.Helper()
	dir, err := binDir()
	if err != nil {
		t.Fatalf("vaulttest: no vault binary: %v\nbuild it with: bash hack/vault.sh (or make testenv), about 15 minutes cold, then export %s=$(bash hack/vault.sh -q)", err, binDirEnv)
	}
	v := &Vault{persistent: opts.Persistent, transitMount: cmp.Or(opts.TransitMount, "transit"),
		bin: filepath.Join(dir, "vault"), dir: t.TempDir()}
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
	mode := "development"
	if v.persistent {
		mode = "persistent"
		err = v.startPersistent()
	} else {
		err = v.startDev()
	}
	if err != nil {
		t.Fatalf("vaulttest: %v", err)
	}
	t.Logf("vaulttest: %s vault ready at %s in %v", mode, v.Addr(), time.Since(begin).Round(time.Millisecond))
	v.EnableSecretsEngine(t, v.transitMount, "transit")
	return v
}

func (v *Vault) startDev() error {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return err
	}
	v.token = "root-" + hex.EncodeToString(b)
	// Development mode listens for cluster traffic on port+1, which may
	// belong to another test, and tearing that listener down makes every
	// Stop and Seal take about half a second. One node needs none.
	if err := os.WriteFile(filepath.Join(v.dir, "vault-dev.json"), []byte(`{"disable_clustering": true}`), 0o600); err != nil {
		return fmt.Errorf("vault configuration: %w", err)
	}
	// The CA file appears only once Vault has generated it, and each run
	// generates a new one: the client is made after Vault is ready.
	if err := v.launch(fixture.FreePort, v.devProcess, "/v1/sys/health"); err != nil {
		return err
	}
	return v.makeClient()
}

// launch runs Vault on the loopback port that pick returns and waits until
// GET readyPath answers 200 OK. Another process may bind the port between
// pick and Vault's own bind; then it picks again, up to three times.
func (v *Vault) launch(pick func() (int, error), run func() (*fixture.Process, error), readyPath string) error {
	var err error
	for range 3 {
		if v.port, err = pick(); err != nil {
			return err
		}
		if v.proc, err = run(); err != nil {
			return err
		}
		if err = v.proc.WaitReady(readyTimeout, getCheck(v.caFile, v.Addr()+readyPath)); err == nil {
			return nil
		}
		if !v.proc.Exited() || !v.proc.PortInUse() {
			return err
		}
	}
	return err
}

func (v *Vault) devProcess() (*fixture.Process, error) {
	return fixture.Start("vault", v.logPath, serverEnv(), v.bin, "server", "-dev",
		"-config="+filepath.Join(v.dir, "vault-dev.json"),
		"-dev-listen-address="+v.hostport(),
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

// getCheck returns a check that GETs url and wants 200 OK: at
// /v1/sys/health that means initialised, unsealed and active. A
// development Vault writes the CA file only once it has generated its
// certificate, so the client is built on the first check that finds it.
func getCheck(caFile, url string) func(context.Context) error {
	var hc *http.Client
	return func(ctx context.Context) error {
		if hc == nil {
			var err error
			if hc, err = fixture.HTTPClient(caFile); err != nil {
				return fmt.Errorf("CA certificate not written yet: %w", err)
			}
		}
		return fixture.GetOK(ctx, hc, url)
	}
}

func (v *Vault) makeClient() error {
	hc, err := fixture.HTTPClient(v.caFile)
	if err != nil {
		return err
	}
	// MaxRetries 0: a helper's failure should show at once, not after the
	// api's backoff.
	c, err := api.NewClient(&api.Config{Address: v.Addr(), HttpClient: hc, MaxRetries: 0, Timeout: requestTimeout})
	if err != nil {
		return fmt.Errorf("vault client: %w", err)
	}
	// NewClient takes VAULT_TOKEN and VAULT_NAMESPACE from the environment;
	// an empty token (a persistent Vault before sys/init) clears it.
	c.SetToken(v.token)
	c.ClearNamespace()
	v.client = c
	return nil
}

// Addr returns Vault's URL, https://127.0.0.1:<port>. Restart keeps it.
func (v *Vault) Addr() string { return "https://" + v.hostport() }

// hostport is the address Vault listens on.
func (v *Vault) hostport() string { return "127.0.0.1:" + strconv.Itoa(v.port) }

// CAFile returns the PEM file of the CA that signed Vault's certificate,
// which names localhost, 127.0.0.1 and ServerName. Restart keeps both.
func (v *Vault) CAFile() string { return v.caFile }

// RootToken returns the root token. A persistent Vault keeps it across
// restarts.
func (v *Vault) RootToken() string { return v.token }

// Client returns an api client holding the root token. Callers must not
// change its token or namespace; use Clone for that.
func (v *Vault) Client() *api.Client { return v.client }

// binDir returns the directory holding the vault binary, located once per
// test binary. -n keeps the script from starting a build.
var binDir = sync.OnceValues(func() (string, error) {
	return fixture.BinDir(binDirEnv, "hack/vault.sh", []string{"-q", "-n"}, "vault")
})
