package envoysim_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/envoysim"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
	"github.com/meshca/meshca/sds"
)

const (
	webFQDN = "web.shop.svc.cluster.local"
	dbFQDN  = "db.shop.svc.cluster.local"
)

var (
	webID = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	dbID  = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/db")
)

// testCtx bounds a test: long enough for the race detector on a busy
// machine, short enough that a hang fails instead of stalling the run.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// issue signs a fresh key for id and returns it as an agent would serve it.
func issue(t *testing.T, a *ca.Authority, id spiffeid.ID) sds.Snapshot {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	issued, err := a.SignKey(context.Background(), key.Public(), id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return sds.Snapshot{Chain: issued.Chain, Key: key, Roots: issued.Roots}
}

// agent serves snap over SDS on a Unix socket, as the node agent does, and
// returns the socket and the Broadcaster to push changes with.
func agent(t *testing.T, snap sds.Snapshot) (string, *sds.Broadcaster) {
	t.Helper()
	b := sds.NewBroadcaster()
	if err := b.Set(snap); err != nil {
		t.Fatal(err)
	}
	srv, err := sds.New(sds.Config{Source: b})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "agent.sock")
	lis, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	srv.Register(gs)
	done := make(chan error, 1)
	go func() { done <- gs.Serve(lis) }()
	t.Cleanup(func() {
		// Stop, not GracefulStop: SDS streams never end by themselves.
		gs.Stop()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return path, b
}

// app is a local application: it greets with "<name>: " and then echoes
// what it reads, so a client can tell which application it reached, and
// whether it reached one at all.
func app(t *testing.T, name string) netip.AddrPort {
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
				if _, err := io.WriteString(c, name+": "); err != nil {
					return
				}
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	return netip.MustParseAddrPort(ln.Addr().String())
}

// exchange sends msg on a connection to addr, half-closes it and returns
// everything received until the other side closed. A connection the proxy
// refuses gives "".
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
	got, err := io.ReadAll(c)
	if ctx.Err() != nil {
		t.Fatalf("exchange with %s: %v", addr, err)
	}
	return string(got)
}

// clientTLS is the configuration of a test client holding snap, which
// records the certificates servers present.
func clientTLS(snap sds.Snapshot, seen *[]*x509.Certificate) *tls.Config {
	cert := tls.Certificate{PrivateKey: snap.Key}
	for _, c := range snap.Chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		Certificates:       []tls.Certificate{cert},
		InsecureSkipVerify: true, // the client's trust is not what these tests are about
		VerifyConnection: func(cs tls.ConnectionState) error {
			if seen != nil {
				*seen = append(*seen, cs.PeerCertificates[0])
			}
			return nil
		},
	}
}

// proxy is one simulated proxy, its files and its clock.
type proxy struct {
	sim   *envoysim.Sim
	clock *clockwork.FakeClock
	dir   string
}

// run renders p, starts a simulator on it and waits until it serves.
func run(t *testing.T, ctx context.Context, p envoyconfig.Proxy) *proxy {
	t.Helper()
	dir := t.TempDir()
	write(t, dir, p)
	return start(t, ctx, writeBootstrap(t, p, dir), dir)
}

// write renders p into the LDS and CDS files in dir.
func write(t *testing.T, dir string, p envoyconfig.Proxy) *envoyconfig.Resources {
	t.Helper()
	res, err := envoyconfig.Render(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := envoyconfig.Write(dir, res); err != nil {
		t.Fatal(err)
	}
	return res
}

// writeBootstrap writes p's bootstrap, reading its files in dir, and
// returns its path.
func writeBootstrap(t *testing.T, p envoyconfig.Proxy, dir string) string {
	t.Helper()
	b, err := envoyconfig.Bootstrap(p, dir)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "bootstrap.json")
	if err := envoyconfig.WriteBootstrap(path, b); err != nil {
		t.Fatal(err)
	}
	return path
}

// start runs a simulator on the bootstrap at path until the test ends.
func start(t *testing.T, ctx context.Context, path, dir string) *proxy {
	t.Helper()
	// TLS checks validity against this clock; it starts at the real time,
	// when the test certificates are valid.
	clock := clockwork.NewFakeClockAt(time.Now())
	sim, err := envoysim.New(envoysim.Config{Bootstrap: path, Clock: clock, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sim.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	p := &proxy{sim: sim, clock: clock, dir: dir}
	p.wait(t, ctx, "it runs", func(s envoysim.Status) bool { return s.Running })
	return p
}

// apply renders p into the watched files and waits until the running
// simulator uses them.
func (px *proxy) apply(t *testing.T, ctx context.Context, p envoyconfig.Proxy) {
	t.Helper()
	res := write(t, px.dir, p)
	lds, err := res.LDS()
	if err != nil {
		t.Fatal(err)
	}
	cds, err := res.CDS()
	if err != nil {
		t.Fatal(err)
	}
	px.poll()
	px.wait(t, ctx, "it applies the new files", func(s envoysim.Status) bool {
		return s.LDS.Version == lds.GetVersionInfo() && s.CDS.Version == cds.GetVersionInfo()
	})
}

// poll lets the simulator's poll ticker fire once.
func (px *proxy) poll() { px.clock.Advance(envoysim.DefaultPollInterval) }

func (px *proxy) wait(t *testing.T, ctx context.Context, what string, cond func(envoysim.Status) bool) envoysim.Status {
	t.Helper()
	st, err := px.sim.Wait(ctx, cond)
	if err != nil {
		t.Fatalf("waiting until %s: %v", what, err)
	}
	return st
}

// waitSecrets waits until the proxy holds its certificate and roots.
func (px *proxy) waitSecrets(t *testing.T, ctx context.Context) {
	t.Helper()
	px.wait(t, ctx, "it holds its secrets", func(s envoysim.Status) bool {
		return s.Secrets[sds.CertName] != "" && s.Secrets[sds.RootsName] != ""
	})
}

func (px *proxy) addr(t *testing.T, listener string) string {
	t.Helper()
	a, ok := px.sim.Status().Listeners[listener]
	if !ok {
		t.Fatalf("no listener %s", listener)
	}
	return a
}

func (px *proxy) counter(name string) uint64 { return px.sim.Status().Counters[name] }

// waitCounter waits until a counter reaches n.
func (px *proxy) waitCounter(t *testing.T, ctx context.Context, name string, n uint64) {
	t.Helper()
	px.wait(t, ctx, name+" reaches "+strconv.FormatUint(n, 10), func(s envoysim.Status) bool { return s.Counters[name] >= n })
}

// service describes one side of the two-service mesh.
func service(fqdn string, a netip.AddrPort, socket string, pol policy.Policy, dests ...envoyconfig.Destination) envoyconfig.Proxy {
	return envoyconfig.Proxy{
		Policy:       pol,
		Service:      envoyconfig.Service{FQDN: fqdn, Listen: netip.MustParseAddrPort("127.0.0.1:0"), App: a},
		Destinations: dests,
		SDSSocket:    socket,
		TrustDomain:  catest.TrustDomain,
	}
}

// destination reaches fqdn's inbound listener at addr.
func destination(fqdn, addr string) envoyconfig.Destination {
	ap := netip.MustParseAddrPort(addr)
	return envoyconfig.Destination{FQDN: fqdn, Listen: netip.MustParseAddrPort("127.0.0.1:0"),
		Address: ap.Addr().String(), Port: ap.Port()}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}
