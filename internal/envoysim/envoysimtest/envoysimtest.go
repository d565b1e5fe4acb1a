// Package envoysimtest runs the Envoy simulator (internal/envoysim) in
// tests: the local application behind a proxy, a client of its listeners,
// and the simulator itself on a fake clock that polls its files only when
// told to.
package envoysimtest

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/meshca/meshca/internal/envoysim"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
)

// App runs a local application on a loopback port until the test ends: it
// writes greeting on each connection, then echoes what it reads until the
// client half-closes, so a client can tell which application it reached,
// and whether it reached one at all.
func App(tb testing.TB, greeting string) netip.AddrPort {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(time.Minute)) // against a hang only
				if _, err := io.WriteString(c, greeting); err == nil {
					_, _ = io.Copy(c, c)
				}
			})
		}
	})
	tb.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	return netip.MustParseAddrPort(ln.Addr().String())
}

// Exchange sends msg on a connection to addr (over TLS with cfg, when set),
// half-closes it and returns everything received until the other side
// closed. A connection the proxy refuses, or a handshake it fails, gives
// "". It fails the test when ctx ends first.
func Exchange(tb testing.TB, ctx context.Context, addr, msg string, cfg *tls.Config) string {
	tb.Helper()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	defer raw.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(dl) // against a hang only
	}
	var c net.Conn = raw
	if cfg != nil {
		tc := tls.Client(raw, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			return ""
		}
		c = tc
	}
	if _, err := io.WriteString(c, msg); err != nil {
		return ""
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		return ""
	}
	got, err := io.ReadAll(c)
	if ctx.Err() != nil {
		tb.Fatalf("exchange with %s: %v (read: %v)", addr, ctx.Err(), err)
	}
	return string(got)
}

// Run runs a simulator with cfg until the test ends, and fails the test if
// it stops with an error. A nil cfg.Logger logs to the test, debug
// included.
func Run(tb testing.TB, cfg envoysim.Config) *envoysim.Sim {
	tb.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(tb.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	sim, err := envoysim.New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sim.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Error(err)
		}
	})
	return sim
}

// Proxy is a simulator run for a test, on a fake clock of its own.
type Proxy struct {
	Sim *envoysim.Sim
	// Clock is the simulator's. It starts at the real time, when test
	// certificates are valid, and moves only when advanced.
	Clock *clockwork.FakeClock
}

// Start runs a simulator on the bootstrap at path until the test ends and
// waits until it runs.
func Start(tb testing.TB, ctx context.Context, bootstrap string) *Proxy {
	tb.Helper()
	clock := clockwork.NewFakeClockAt(time.Now())
	p := &Proxy{Sim: Run(tb, envoysim.Config{Bootstrap: bootstrap, Clock: clock}), Clock: clock}
	p.Wait(tb, ctx, "the simulator runs", func(s envoysim.Status) bool { return s.Running })
	return p
}

// Wait waits until cond holds of the simulator's status, and returns that
// status; it fails the test, saying what it waited for, when ctx ends
// first.
func (p *Proxy) Wait(tb testing.TB, ctx context.Context, what string, cond func(envoysim.Status) bool) envoysim.Status {
	tb.Helper()
	st, err := p.Sim.Wait(ctx, cond)
	if err != nil {
		tb.Fatalf("waiting until %s: %v", what, err)
	}
	return st
}

// Poll lets the simulator's poll ticker fire once.
func (p *Proxy) Poll() { p.Clock.Advance(envoysim.DefaultPollInterval) }

// Reload lets the simulator poll and waits until it runs the LDS and CDS
// files now in dir, the directory its bootstrap names.
func (p *Proxy) Reload(tb testing.TB, ctx context.Context, dir string) {
	tb.Helper()
	version := func(name, typeURL string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			tb.Fatal(err)
		}
		resp, _, err := envoyconfig.ParseResponse(b, typeURL)
		if err != nil {
			tb.Fatal(err)
		}
		return resp.GetVersionInfo()
	}
	lds, cds := version(envoyconfig.LDSFile, envoyconfig.ListenerType), version(envoyconfig.CDSFile, envoyconfig.ClusterType)
	p.Poll()
	p.Wait(tb, ctx, "the simulator runs the new files", func(s envoysim.Status) bool {
		return s.LDS.Version == lds && s.CDS.Version == cds
	})
}
