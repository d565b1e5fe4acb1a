package sds_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net"
	"path/filepath"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

var (
	web = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/web")
	db  = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/db")
)

// testCtx bounds a test: long enough for the race detector on a busy
// machine, short enough that a hang fails instead of stalling the run.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// fakeClock starts at the real time (TLS handshakes check validity against
// the wall clock), whole seconds as certificates record them.
func fakeClock() *clockwork.FakeClock {
	return clockwork.NewFakeClockAt(time.Now().Truncate(time.Second))
}

func p256(t testing.TB) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// issue signs a fresh key for id and returns it as a snapshot.
func issue(t testing.TB, a *ca.Authority, id spiffeid.ID) sds.Snapshot {
	t.Helper()
	key := p256(t)
	issued, err := a.SignKey(context.Background(), key.Public(), id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return sds.Snapshot{Chain: issued.Chain, Key: key, Roots: issued.Roots}
}

// newRoot makes a self-signed root outside any authority: the second root
// of a rotation, as far as proxies can tell.
func newRoot(t testing.TB) *x509.Certificate {
	t.Helper()
	now := time.Now()
	return catest.NewRoot(t, ca.Validity{NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour)})
}

// withRoots returns s serving roots instead.
func withRoots(s sds.Snapshot, roots ...*x509.Certificate) sds.Snapshot {
	s.Roots = roots
	return s
}

func newServer(t testing.TB, cfg sds.Config) (*sds.Server, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg.Metrics = reg
	s, err := sds.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s, reg
}

// serveUnix serves s on a Unix socket in a temporary directory, as the node
// agent does, and returns a connection to it.
func serveUnix(t testing.TB, s *sds.Server) (target string, conn *grpc.ClientConn) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "sds.sock")
	lis, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	sdstest.Serve(t, s, lis)
	target = "unix://" + path
	return target, dial(t, target, grpc.WithTransportCredentials(insecure.NewCredentials()))
}

// serveTLS serves s on a loopback TCP port with a serving certificate from
// a, as the central server does, and returns its address and the client
// credentials that trust it.
func serveTLS(t testing.TB, s *sds.Server, a *ca.Authority) (string, credentials.TransportCredentials) {
	t.Helper()
	key := p256(t)
	issued, err := a.IssueServing(context.Background(), key.Public(),
		spiffeid.RequireFromString("spiffe://cluster.local/ns/meshca-system/sa/meshca"), nil,
		[]net.IP{net.IPv4(127, 0, 0, 1)}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{PrivateKey: key, Leaf: issued.Leaf()}
	for _, c := range issued.Chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sdstest.Serve(t, s, lis, grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}})))
	roots := x509.NewCertPool()
	for _, r := range issued.Roots {
		roots.AddCert(r)
	}
	return lis.Addr().String(), credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots})
}

func dial(t testing.TB, target string, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// connect starts an Envoy-like client and ends it with the test.
func connect(t testing.TB, ctx context.Context, cfg sdstest.Config) *sdstest.Client {
	t.Helper()
	c := sdstest.New(cfg)
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Disconnect)
	return c
}

// wait is Client.Wait that fails the test.
func wait(t testing.TB, ctx context.Context, c *sdstest.Client, cond func(sdstest.State) bool) sdstest.State {
	t.Helper()
	s, err := c.Wait(ctx, cond)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func hasBoth(s sdstest.State) bool { return s.Has(sds.CertName, sds.RootsName) }

// eventually polls cond until it holds or ctx ends.
func eventually(t testing.TB, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting until %s", what)
		case <-tick.C:
		}
	}
}

// ackedIs waits until count(key), s.Acked of a root's fingerprint or
// s.PolicyAcked of a policy version, reports exactly (acked, of) streams,
// woken by AckChanged as a root rotation is.
func ackedIs(tb testing.TB, ctx context.Context, s *sds.Server, count func(string) (int, int), key string, acked, of int) {
	tb.Helper()
	for {
		changed := s.AckChanged()
		a, n := count(key)
		if a == acked && n == of {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			tb.Fatalf("%s: %d of %d streams ACKed, want %d of %d", key, a, n, acked, of)
		}
	}
}

// rpcModes are the three ways to ask for secrets: a state-of-the-world
// stream, a delta stream and FetchSecrets.
var rpcModes = []string{"sotw", "delta", "fetch"}

// firstAnswer asks rpc for names of typeURL as node, the way mode says,
// and returns the error of the first answer, nil when it is a response.
func firstAnswer(ctx context.Context, rpc secretv3.SecretDiscoveryServiceClient, mode string, node *corev3.Node, typeURL string, names []string) error {
	var err error
	switch mode {
	case "sotw":
		var s grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
		if s, err = rpc.StreamSecrets(ctx); err == nil {
			if err = s.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: typeURL, ResourceNames: names}); err == nil {
				_, err = s.Recv()
			}
		}
	case "delta":
		var s grpc.BidiStreamingClient[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]
		if s, err = rpc.DeltaSecrets(ctx); err == nil {
			if err = s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: typeURL, ResourceNamesSubscribe: names}); err == nil {
				_, err = s.Recv()
			}
		}
	case "fetch":
		_, err = rpc.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{Node: node, TypeUrl: typeURL, ResourceNames: names})
	default:
		panic("unknown mode " + mode)
	}
	return err
}

// metric returns the value of the series of name with the given labels
// (name=value pairs), or -1 when there is none.
func metric(t testing.TB, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if matches(m, labels) {
				switch {
				case m.GetCounter() != nil:
					return m.GetCounter().GetValue()
				case m.GetGauge() != nil:
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	return -1
}

func matches(m *dto.Metric, labels []string) bool {
	for i := 0; i+1 < len(labels); i += 2 {
		found := false
		for _, lp := range m.GetLabel() {
			if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// protocols runs f once per streaming protocol.
func protocols(t *testing.T, f func(t *testing.T, delta bool)) {
	t.Run("sotw", func(t *testing.T) { f(t, false) })
	t.Run("delta", func(t *testing.T) { f(t, true) })
}
