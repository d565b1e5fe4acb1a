package envoysim_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/envoysim"
	"github.com/meshca/meshca/internal/envoysim/envoysimtest"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
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
	sdstest.Serve(t, srv, lis)
	return path, b
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

// proxy is one simulated proxy and the directory of its files.
type proxy struct {
	*envoysimtest.Proxy
	dir string
}

// run renders p, starts a simulator on it and waits until it serves.
func run(t *testing.T, ctx context.Context, p envoyconfig.Proxy) *proxy {
	t.Helper()
	dir := t.TempDir()
	write(t, dir, p)
	return &proxy{Proxy: envoysimtest.Start(t, ctx, writeBootstrap(t, p, dir)), dir: dir}
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

// apply renders p into the watched files and waits until the running
// simulator uses them.
func (px *proxy) apply(t *testing.T, ctx context.Context, p envoyconfig.Proxy) {
	t.Helper()
	write(t, px.dir, p)
	px.Reload(t, ctx, px.dir)
}

// waitSecrets waits until the proxy holds its certificate and roots.
func (px *proxy) waitSecrets(t *testing.T, ctx context.Context) {
	t.Helper()
	px.Wait(t, ctx, "it holds its secrets", func(s envoysim.Status) bool {
		return s.Secrets[sds.CertName] != "" && s.Secrets[sds.RootsName] != ""
	})
}

func (px *proxy) addr(t *testing.T, listener string) string {
	t.Helper()
	a, ok := px.Sim.Status().Listeners[listener]
	if !ok {
		t.Fatalf("no listener %s", listener)
	}
	return a
}

func (px *proxy) counter(name string) uint64 { return px.Sim.Status().Counters[name] }

// waitCounter waits until a counter reaches n.
func (px *proxy) waitCounter(t *testing.T, ctx context.Context, name string, n uint64) {
	t.Helper()
	px.Wait(t, ctx, name+" reaches "+strconv.FormatUint(n, 10), func(s envoysim.Status) bool { return s.Counters[name] >= n })
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
