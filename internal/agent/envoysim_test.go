package agent_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
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
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
	"github.com/meshca/meshca/sds"
)

// greeter is the local application: it greets with "web: " and echoes.
func greeter(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				if _, err := io.WriteString(c, "web: "); err == nil {
					_, _ = io.Copy(c, c)
				}
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	return netip.MustParseAddrPort(ln.Addr().String())
}

// exchange sends msg to addr (over TLS with cfg, when set), half-closes
// and returns all it gets back; a connection the proxy refuses gives "".
func exchange(t *testing.T, ctx context.Context, addr, msg string, cfg *tls.Config) string {
	t.Helper()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
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
	got, _ := io.ReadAll(c)
	if ctx.Err() != nil {
		t.Fatalf("exchange with %s: %v", addr, ctx.Err())
	}
	return string(got)
}

// sim runs the Envoy simulator on the bootstrap the agent wrote.
type sim struct {
	*envoysim.Sim
	clock *clockwork.FakeClock
	dir   string
}

func startSim(t *testing.T, ctx context.Context, dir string) *sim {
	t.Helper()
	// Its own clock, at the real time: TLS checks validity against it.
	clock := clockwork.NewFakeClockAt(time.Now())
	s, err := envoysim.New(envoysim.Config{Bootstrap: filepath.Join(dir, envoyconfig.BootstrapFile), Clock: clock,
		Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	sm := &sim{Sim: s, clock: clock, dir: dir}
	sm.wait(t, ctx, "it serves with its secrets", func(st envoysim.Status) bool {
		return st.Running && st.Secrets[sds.CertName] != "" && st.Secrets[sds.RootsName] != ""
	})
	return sm
}

func (s *sim) wait(t *testing.T, ctx context.Context, what string, cond func(envoysim.Status) bool) envoysim.Status {
	t.Helper()
	st, err := s.Wait(ctx, cond)
	if err != nil {
		t.Fatalf("waiting until the simulator %s: %v", what, err)
	}
	return st
}

// reload lets the simulator poll the agent's files and waits until it runs
// what they hold.
func (s *sim) reload(t *testing.T, ctx context.Context) {
	t.Helper()
	version := func(name, typeURL string) string {
		b, err := os.ReadFile(filepath.Join(s.dir, name))
		if err != nil {
			t.Fatal(err)
		}
		resp, _, err := envoyconfig.ParseResponse(b, typeURL)
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetVersionInfo()
	}
	lds, cds := version(envoyconfig.LDSFile, envoyconfig.ListenerType), version(envoyconfig.CDSFile, envoyconfig.ClusterType)
	s.clock.Advance(envoysim.DefaultPollInterval)
	s.wait(t, ctx, "applies the agent's new files", func(st envoysim.Status) bool {
		return st.LDS.Version == lds && st.CDS.Version == cds
	})
}

// TestEnvoySimFollowsTheAgentsPolicy: an Envoy-like proxy runs the
// bootstrap and files the agent writes. Under STRICT a plaintext client is
// refused and an mTLS client served; once the service is excluded, or mTLS
// is off, plaintext gets through; back to STRICT it is refused again. The
// proxy never restarts: the inbound listener keeps its socket throughout.
func TestEnvoySimFollowsTheAgentsPolicy(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	m.setPolicy(t, strictAll)
	cfg := m.envoyConfig(t)
	cfg.Proxy = proxyTemplate(netip.MustParseAddrPort("127.0.0.1:0"), greeter(t))
	cfg.Proxy.Destinations[0].Listen = netip.MustParseAddrPort("127.0.0.1:0")
	a := m.startReady(t, ctx, cfg)
	m.applied(t, ctx, a, strictAll)
	s := startSim(t, ctx, cfg.EnvoyConfigDir)
	addr := s.Status().Listeners[envoyconfig.InboundListener]
	if addr == "" {
		t.Fatal("no inbound listener")
	}

	// A client of the mesh: a certificate for db from the same CA.
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	issued, err := m.first.SignKey(ctx, key.Public(), dbID, leafTTL)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{PrivateKey: key}
	for _, c := range issued.Chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	mtls := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert},
		InsecureSkipVerify: true} // the server side is under test, not the client's trust

	const msg, served = "hello", "web: hello"
	refusals := "listener." + envoyconfig.InboundListener + ".no_filter_chain_match"
	if got := exchange(t, ctx, addr, msg, nil); got != "" || s.Status().Counters[refusals] != 1 {
		t.Fatalf("STRICT: a plaintext client got %q (%s %d), want the connection refused for want of a chain",
			got, refusals, s.Status().Counters[refusals])
	}
	if got := exchange(t, ctx, addr, msg, mtls); got != served {
		t.Fatalf("STRICT: an mTLS client got %q, want %q", got, served)
	}

	for _, step := range []struct {
		p         policy.Policy
		plaintext bool
	}{
		{webExcluded, true},
		{strictAll, false},
		{mtlsOff, true},
	} {
		m.setPolicy(t, step.p)
		m.applied(t, ctx, a, step.p)
		s.reload(t, ctx)
		want := ""
		if step.plaintext {
			want = served
		}
		if got := exchange(t, ctx, addr, msg, nil); got != want {
			t.Fatalf("under %v: a plaintext client got %q, want %q", step.p, got, want)
		}
		if st := s.Status(); !st.Running || st.Listeners[envoyconfig.InboundListener] != addr {
			t.Fatalf("under %v: the simulator runs %v, inbound at %s; want it running at %s all along",
				step.p, st.Running, st.Listeners[envoyconfig.InboundListener], addr)
		}
	}
}
