package agent_test

import (
	"context"
	"crypto/x509"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshca/meshca/internal/agent"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// offlineConfig is an agent whose server is unreachable: enough to test
// what it does locally. The fake clock never moves, so it makes one
// attempt of each kind.
func offlineConfig(t *testing.T, socket string) agent.Config {
	t.Helper()
	token := filepath.Join(t.TempDir(), "token")
	writeToken(t, token, "unused")
	return agent.Config{
		ServerAddr:  "127.0.0.1:1",
		TrustBundle: []*x509.Certificate{newRoot(t)},
		TokenFile:   token,
		SocketPath:  socket,
		Clock:       clockwork.NewFakeClock(),
	}
}

// runAgent runs an agent until stop is called, which returns Run's result.
func runAgent(t *testing.T, cfg agent.Config) (a *agent.Agent, stop func() error) {
	t.Helper()
	a, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var result error
	stopped := false
	stop = func() error {
		if !stopped {
			cancel()
			result, stopped = <-done, true
		}
		return result
	}
	t.Cleanup(func() { _ = stop() })
	return a, stop
}

// servesRoots connects an Envoy-like client to socket and waits for the
// trust bundle, which the agent serves before it has a certificate.
func servesRoots(t *testing.T, ctx context.Context, socket string) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := sdstest.New(sdstest.Config{Conn: conn, Node: "probe"})
	eventually(t, ctx, "the socket serves", func() error {
		c.Disconnect()
		return c.Connect(ctx)
	})
	defer c.Disconnect()
	wait(t, ctx, c, func(s sdstest.State) bool { return s.Has(sds.RootsName) })
}

func mode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode()
}

func TestSocketCreatedPrivateAndRemovedOnExit(t *testing.T) {
	ctx := testCtx(t)
	dir := filepath.Join(t.TempDir(), "run", "meshca")
	socket := filepath.Join(dir, "sds.sock")
	a, stop := runAgent(t, offlineConfig(t, socket))
	servesRoots(t, ctx, socket)

	if m := mode(t, dir); !m.IsDir() || m.Perm() != 0o700 {
		t.Errorf("socket directory mode %v, want 0700", m)
	}
	if m := mode(t, socket); m.Type() != fs.ModeSocket || m.Perm() != 0o600 {
		t.Errorf("socket mode %v, want a socket with 0600", m)
	}
	// No temporary name is left behind.
	if entries, err := os.ReadDir(dir); err != nil || len(entries) != 1 {
		t.Errorf("socket directory holds %v (%v), want only the socket", entries, err)
	}
	// Without a server there is nothing to be ready with, and Status says why.
	eventually(t, ctx, "the first request failed", func() error { return nilIf(a.Status().LastError != nil) })
	if err := a.Ready(); !errors.Is(err, agent.ErrNoCertificate) {
		t.Errorf("Ready() = %v without a certificate, want ErrNoCertificate", err)
	}

	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if _, err := os.Lstat(socket); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("socket still there after exit: %v", err)
	}
}

func TestReplacesAStaleSocket(t *testing.T) {
	ctx := testCtx(t)
	socket := filepath.Join(t.TempDir(), "sds.sock")
	// A socket nobody listens on any more, as a crashed agent leaves it.
	lis, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	lis.(*net.UnixListener).SetUnlinkOnClose(false)
	lis.Close()
	if m := mode(t, socket); m.Type() != fs.ModeSocket {
		t.Fatalf("setup: %s is not a socket", socket)
	}

	runAgent(t, offlineConfig(t, socket))
	servesRoots(t, ctx, socket)
	if m := mode(t, socket); m.Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", m)
	}
}

func TestRefusesToReplaceWhatIsNotAStaleSocket(t *testing.T) {
	t.Run("regular file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "sds.sock")
		if err := os.WriteFile(path, []byte("keep me"), 0o644); err != nil {
			t.Fatal(err)
		}
		_, stop := runAgent(t, offlineConfig(t, path))
		if err := stop(); err == nil || !strings.Contains(err.Error(), "not a socket") {
			t.Fatalf("Run = %v, want a refusal to replace a file", err)
		}
		if b, err := os.ReadFile(path); err != nil || string(b) != "keep me" {
			t.Fatalf("file was touched: %q, %v", b, err)
		}
	})
	t.Run("socket in use", func(t *testing.T) {
		ctx := testCtx(t)
		socket := filepath.Join(t.TempDir(), "sds.sock")
		runAgent(t, offlineConfig(t, socket))
		servesRoots(t, ctx, socket)

		second, err := agent.New(offlineConfig(t, socket))
		if err != nil {
			t.Fatal(err)
		}
		runCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := second.Run(runCtx); err == nil || !strings.Contains(err.Error(), "in use") {
			t.Fatalf("second agent on the same socket: Run = %v, want a refusal", err)
		}
		// The first one still serves.
		servesRoots(t, ctx, socket)
	})
}

func TestConfigValidation(t *testing.T) {
	valid := offlineConfig(t, filepath.Join(t.TempDir(), "sds.sock"))
	if _, err := agent.New(valid); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	for name, mutate := range map[string]func(*agent.Config){
		"no server":          func(c *agent.Config) { c.ServerAddr = "" },
		"no trust bundle":    func(c *agent.Config) { c.TrustBundle = nil },
		"nil root":           func(c *agent.Config) { c.TrustBundle = append(c.TrustBundle, nil) },
		"no token file":      func(c *agent.Config) { c.TokenFile = "" },
		"no socket":          func(c *agent.Config) { c.SocketPath = "" },
		"unknown key type":   func(c *agent.Config) { c.KeyType = "dsa-1024" },
		"negative TTL":       func(c *agent.Config) { c.TTL = -time.Second },
		"renewal after end":  func(c *agent.Config) { c.RenewAt = 0.95 },
		"jitter past start":  func(c *agent.Config) { c.RenewAt, c.Jitter = 0.2, 0.3 },
		"backoff not range":  func(c *agent.Config) { c.RetryMin, c.RetryMax = time.Minute, time.Second },
		"negative retry min": func(c *agent.Config) { c.RetryMin = -time.Second },
	} {
		cfg := valid
		cfg.TrustBundle = append([]*x509.Certificate(nil), valid.TrustBundle...)
		mutate(&cfg)
		if _, err := agent.New(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
