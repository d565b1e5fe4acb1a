package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/keystore/memory"
)

func start(t *testing.T, cfg server.Config) *server.Server {
	t.Helper()
	cfg.GRPCAddr, cfg.MonitorAddr = "127.0.0.1:0", "127.0.0.1:0"
	cfg.ServerID = spiffeid.RequireFromString("spiffe://cluster.local/ns/meshca-system/sa/meshca")
	cfg.IPs = []net.IP{net.IPv4(127, 0, 0, 1)}
	s, err := server.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return s
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestReadyzReportsEachCheck(t *testing.T) {
	ready := errors.New("still loading")
	s := start(t, server.Config{CA: catest.NewAuthority(t, clockwork.NewRealClock()), Ready: map[string]server.Check{
		"ca":    func() error { return nil },
		"vault": func() error { return ready },
	}})
	code, body := get(t, "http://"+s.MonitorAddr()+"/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "[+] ca ok") || !strings.Contains(body, "[-] vault: still loading") {
		t.Fatalf("/readyz = %d %q, want 503 naming the failing check", code, body)
	}
	ready = server.Degraded(errors.New("renewal failing"))
	code, body = get(t, "http://"+s.MonitorAddr()+"/readyz")
	if code != http.StatusOK || !strings.Contains(body, "[!] vault degraded: renewal failing") {
		t.Fatalf("/readyz = %d %q with a degraded check, want 200 showing it", code, body)
	}
	ready = nil
	if code, body = get(t, "http://"+s.MonitorAddr()+"/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz = %d %q after the check passed, want 200", code, body)
	}
	if code, _ = get(t, "http://"+s.MonitorAddr()+"/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz = %d", code)
	}
}

// servingChain handshakes with the gRPC port and returns the certificates
// the server presented, verified against roots.
func servingChain(t *testing.T, s *server.Server, clock clockwork.Clock, roots []*x509.Certificate) []*x509.Certificate {
	t.Helper()
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	conn, err := tls.Dial("tcp", s.GRPCAddr(), &tls.Config{RootCAs: pool, NextProtos: []string{"h2"}, Time: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates
}

func TestServingCertificateFollowsTheCA(t *testing.T) {
	// Both ends of the handshake check validity at the fake clock's time.
	clock := clockwork.NewFakeClockAt(time.Now())
	a := catest.NewAuthority(t, clock)
	s := start(t, server.Config{CA: a, Clock: clock})

	first := servingChain(t, s, clock, a.Issuer().Roots)
	if len(first) != 2 || !first[1].Equal(a.Issuer().Cert) {
		t.Fatal("serving chain is not leaf + current intermediate")
	}
	if got := first[0].URIs[0].String(); got != "spiffe://cluster.local/ns/meshca-system/sa/meshca" {
		t.Errorf("serving certificate identity %s", got)
	}
	if again := servingChain(t, s, clock, a.Issuer().Roots); !again[0].Equal(first[0]) {
		t.Error("serving certificate re-issued without a reason")
	}

	// A new intermediate: the very next handshake presents a certificate
	// from it, on the same listener.
	clock.Advance(25 * time.Hour)
	if err := a.Maintain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if a.Issuer().Cert.Equal(first[1]) {
		t.Fatal("intermediate did not change")
	}
	next := servingChain(t, s, clock, a.Issuer().Roots)
	if !next[1].Equal(a.Issuer().Cert) || next[0].Equal(first[0]) {
		t.Fatal("serving certificate did not follow the CA change")
	}
}

// A serving certificate shorter-lived than the CA's one-minute backdating is
// still reused until half its life has passed: counted from its NotBefore it
// would be due at once, and re-issued on every handshake.
func TestShortLivedServingCertificateIsReused(t *testing.T) {
	clock := clockwork.NewFakeClockAt(time.Now())
	src, err := ca.NewSelfManaged(ca.SelfManagedConfig{TrustDomain: catest.TrustDomain, Keys: memory.New(),
		JournalPath: filepath.Join(t.TempDir(), "ca-journal.json")})
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.New(ca.Config{TrustDomain: catest.TrustDomain, Source: src, Clock: clock,
		TTL: ca.TTLPolicy{Default: 20 * time.Second, Max: 20 * time.Second, Coverage: 3}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	s := start(t, server.Config{CA: a, Clock: clock})

	first := servingChain(t, s, clock, a.Issuer().Roots)
	if again := servingChain(t, s, clock, a.Issuer().Roots); !again[0].Equal(first[0]) {
		t.Fatal("a 20s serving certificate was re-issued at the next handshake")
	}
	clock.Advance(9 * time.Second)
	if again := servingChain(t, s, clock, a.Issuer().Roots); !again[0].Equal(first[0]) {
		t.Fatal("re-issued before half of its 20s life")
	}
	clock.Advance(2 * time.Second)
	if again := servingChain(t, s, clock, a.Issuer().Roots); again[0].Equal(first[0]) {
		t.Fatal("not re-issued past half of its life")
	}
}
