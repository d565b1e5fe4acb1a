package sds_test

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/identity/devtoken"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// checkSecrets asserts what the node agent's proxies must get: a chain
// without the root that verifies to the bundle as id, with its key, and the
// bundle itself.
func checkSecrets(t *testing.T, c *sdstest.Client, a *ca.Authority, id spiffeid.ID) {
	t.Helper()
	svid, err := c.SVID()
	if err != nil {
		t.Fatal(err)
	}
	roots, err := c.Roots()
	if err != nil {
		t.Fatal(err)
	}
	want := a.Issuer().Roots
	if len(roots) != len(want) || !roots[0].Equal(want[0]) {
		t.Fatalf("ROOTCA holds %d certificates, want the authority's %d roots", len(roots), len(want))
	}
	for _, cert := range svid.Certificates {
		for _, r := range want {
			if cert.Equal(r) {
				t.Fatal("the chain in \"default\" includes the root")
			}
		}
	}
	got, _, err := x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(catest.TrustDomain, roots))
	if err != nil || got != id {
		t.Fatalf("x509svid.Verify: id %s, err %v; want %s", got, err, id)
	}
	pub, ok := svid.PrivateKey.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(svid.Certificates[0].PublicKey) {
		t.Fatal("private key does not match the leaf")
	}
}

// handshake runs mTLS between two proxies' configurations over an in-memory
// pipe, exchanges a message, and returns the identity each side saw.
func handshake(t *testing.T, ctx context.Context, client, server *tls.Config) (serverSaw, clientSaw spiffeid.ID) {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	cli, srv := tls.Client(a, client), tls.Server(b, server)
	type result struct {
		id  spiffeid.ID
		err error
	}
	done := make(chan result, 1)
	go func() {
		if err := srv.HandshakeContext(ctx); err != nil {
			done <- result{err: err}
			return
		}
		buf := make([]byte, 5)
		if _, err := io.ReadFull(srv, buf); err != nil || string(buf) != "hello" {
			done <- result{err: err}
			return
		}
		id, err := x509svid.IDFromCert(srv.ConnectionState().PeerCertificates[0])
		done <- result{id: id, err: err}
	}()
	if err := cli.HandshakeContext(ctx); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if _, err := cli.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil {
		t.Fatalf("server side: %v", r.err)
	}
	clientSaw, err := x509svid.IDFromCert(cli.ConnectionState().PeerCertificates[0])
	if err != nil {
		t.Fatal(err)
	}
	return r.id, clientSaw
}

func tlsConfig(t *testing.T, c *sdstest.Client) *tls.Config {
	t.Helper()
	cfg, err := c.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestNodeAgentOverUnixSocket is the node agent's case: one local identity
// per socket, served to whoever connects. Two agents, two workloads; their
// proxies get their secrets by every RPC and complete mTLS with each other.
func TestNodeAgentOverUnixSocket(t *testing.T) {
	ctx := testCtx(t)
	a := catest.NewAuthority(t, fakeClock())
	agent := func(id spiffeid.ID) *grpc.ClientConn {
		b := sds.NewBroadcaster()
		if err := b.Set(issue(t, a, id)); err != nil {
			t.Fatal(err)
		}
		s, _ := newServer(t, sds.Config{Source: b})
		_, conn := serveUnix(t, s)
		return conn
	}
	webConn, dbConn := agent(web), agent(db)

	for _, mode := range []string{"sotw", "delta", "fetch"} {
		t.Run(mode, func(t *testing.T) {
			clients := make([]*sdstest.Client, 2)
			for i, conn := range []*grpc.ClientConn{webConn, dbConn} {
				cfg := sdstest.Config{Conn: conn, Node: mode, Delta: mode == "delta"}
				if mode == "fetch" {
					clients[i] = sdstest.New(cfg)
					if err := clients[i].Fetch(ctx); err != nil {
						t.Fatal(err)
					}
					continue
				}
				clients[i] = connect(t, ctx, cfg)
				wait(t, ctx, clients[i], hasBoth)
			}
			checkSecrets(t, clients[0], a, web)
			checkSecrets(t, clients[1], a, db)
			serverSaw, clientSaw := handshake(t, ctx, tlsConfig(t, clients[0]), tlsConfig(t, clients[1]))
			if serverSaw != web || clientSaw != db {
				t.Fatalf("db saw %s, web saw %s", serverSaw, clientSaw)
			}
		})
	}
}

// signingSource is a central server's source: a certificate per proxy
// identity, signed only for streams that ask for one.
type signingSource struct {
	t      *testing.T
	a      *ca.Authority
	signed atomic.Int32
}

type fixedWatcher struct{ s *sds.Snapshot }

func (w fixedWatcher) Snapshot() *sds.Snapshot { return w.s }
func (fixedWatcher) Close()                    {}

func (s *signingSource) Watch(_ context.Context, p sds.Peer, want sds.Want, _ func()) (sds.Watcher, error) {
	snap := sds.Snapshot{Roots: s.a.Issuer().Roots}
	if want.Cert {
		snap = issue(s.t, s.a, p.ID)
		s.signed.Add(1)
	}
	return fixedWatcher{&snap}, nil
}

// TestCentralServerOverTLS is the central server's case: TCP with TLS, the
// proxy's identity from its bearer token, a certificate per identity.
func TestCentralServerOverTLS(t *testing.T) {
	ctx := testCtx(t)
	clock := fakeClock()
	a := catest.NewAuthority(t, clock)
	tokens, err := devtoken.New(devtoken.Config{TrustDomain: catest.TrustDomain, Clock: clock, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	src := &signingSource{t: t, a: a}
	s, _ := newServer(t, sds.Config{Source: src, Authenticate: sds.BearerAuthenticator(tokens), Clock: clock})
	addr, creds := serveTLS(t, s, a)
	conn := dial(t, addr, grpc.WithTransportCredentials(creds))
	bearer := func(sa string) metadata.MD {
		tok, err := tokens.Mint(devtoken.MintRequest{Namespace: "default", ServiceAccount: sa})
		if err != nil {
			t.Fatal(err)
		}
		return metadata.Pairs("authorization", "Bearer "+tok)
	}

	webC := connect(t, ctx, sdstest.Config{Conn: conn, Node: "web-1", Metadata: bearer("web")})
	dbC := connect(t, ctx, sdstest.Config{Conn: conn, Node: "db-1", Metadata: bearer("db"), Delta: true})
	wait(t, ctx, webC, hasBoth)
	wait(t, ctx, dbC, hasBoth)
	checkSecrets(t, webC, a, web)
	checkSecrets(t, dbC, a, db)
	serverSaw, clientSaw := handshake(t, ctx, tlsConfig(t, dbC), tlsConfig(t, webC))
	if serverSaw != db || clientSaw != web {
		t.Fatalf("web saw %s, db saw %s", serverSaw, clientSaw)
	}

	st := s.Status()
	var ids []string
	for _, ss := range st {
		ids = append(ids, ss.Peer.ID.String())
	}
	slices.Sort(ids)
	if !slices.Equal(ids, []string{db.String(), web.String()}) {
		t.Fatalf("status lists %v, want the two authenticated proxies", ids)
	}
	for _, ss := range st {
		if ss.Since != clock.Now() || ss.Peer.Addr == "" || ss.Peer.Node == "" {
			t.Errorf("status %+v: want connected-since from the clock, an address and a node", ss)
		}
	}

	// A stream for the bundle alone costs no signature.
	roots := connect(t, ctx, sdstest.Config{Conn: conn, Node: "web-2", Metadata: bearer("web"), Names: []string{sds.RootsName}})
	wait(t, ctx, roots, func(s sdstest.State) bool { return s.Has(sds.RootsName) })
	if n := src.signed.Load(); n != 2 {
		t.Errorf("source signed %d certificates, want 2 (none for the ROOTCA-only stream)", n)
	}

	// No token, no secrets.
	anon := connect(t, ctx, sdstest.Config{Conn: conn, Node: "anon"})
	got := wait(t, ctx, anon, func(s sdstest.State) bool { return !s.Connected })
	if status.Code(got.Err) != codes.Unauthenticated || len(got.Responses) != 0 {
		t.Fatalf("stream without a token ended with %v after %d responses, want Unauthenticated and none", got.Err, len(got.Responses))
	}
}

func TestFetchWaitsForTheSecrets(t *testing.T) {
	ctx := testCtx(t)
	a := catest.NewAuthority(t, fakeClock())
	b := sds.NewBroadcaster()
	s, _ := newServer(t, sds.Config{Source: b})
	_, conn := serveUnix(t, s)
	c := sdstest.New(sdstest.Config{Conn: conn, Node: "early"})
	done := make(chan error, 1)
	go func() { done <- c.Fetch(ctx) }()
	if err := b.Set(issue(t, a, web)); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	checkSecrets(t, c, a, web)

	short, cancel := context.WithTimeout(ctx, time.Millisecond)
	defer cancel()
	empty := sds.NewBroadcaster()
	s2, _ := newServer(t, sds.Config{Source: empty})
	_, conn2 := serveUnix(t, s2)
	if err := sdstest.New(sdstest.Config{Conn: conn2}).Fetch(short); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("fetch with nothing to serve: %v, want DeadlineExceeded", err)
	}
}

func TestSecretEncoding(t *testing.T) {
	ctx := testCtx(t)
	a := catest.NewAuthority(t, fakeClock())
	b := sds.NewBroadcaster()
	snap := issue(t, a, web)
	if err := b.Set(snap); err != nil {
		t.Fatal(err)
	}
	s, _ := newServer(t, sds.Config{Source: b})
	_, conn := serveUnix(t, s)
	c := connect(t, ctx, sdstest.Config{Conn: conn, Delta: true})
	st := wait(t, ctx, c, hasBoth)

	tc := st.Secrets[sds.CertName].Secret.GetTlsCertificate()
	if got, want := string(tc.GetCertificateChain().GetInlineBytes()), string(ca.EncodeCerts(snap.Chain...)); got != want {
		t.Errorf("certificate_chain:\n%s\nwant leaf first, no root:\n%s", got, want)
	}
	if _, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes()); err != nil {
		t.Errorf("chain and key do not form a key pair: %v", err)
	}
	vc := st.Secrets[sds.RootsName].Secret.GetValidationContext()
	if got, want := string(vc.GetTrustedCa().GetInlineBytes()), string(ca.EncodeCerts(snap.Roots...)); got != want {
		t.Errorf("trusted_ca:\n%s\nwant:\n%s", got, want)
	}
	if st.Secrets[sds.CertName].Secret.GetName() != sds.CertName || st.Secrets[sds.RootsName].Secret.GetName() != sds.RootsName {
		t.Error("secrets are not named after their resources")
	}
}

func TestBroadcasterRefusesMismatchedKey(t *testing.T) {
	a := catest.NewAuthority(t, fakeClock())
	snap := issue(t, a, web)
	snap.Key = p256(t)
	if err := sds.NewBroadcaster().Set(snap); err == nil {
		t.Fatal("Set accepted a key that does not match the leaf")
	}
	snap.Key = nil
	if err := sds.NewBroadcaster().Set(snap); err == nil {
		t.Fatal("Set accepted a chain without a key")
	}
}

func TestNewRequiresASource(t *testing.T) {
	if _, err := sds.New(sds.Config{}); err == nil {
		t.Fatal("New accepted a config without a source")
	}
}

// rejectRoot NACKs any ROOTCA that contains root.
func rejectRoot(root *x509.Certificate) func(*tlsv3.Secret) error {
	pemRoot := string(ca.EncodeCerts(root))
	return func(s *tlsv3.Secret) error {
		if vc := s.GetValidationContext(); vc != nil && strings.Contains(string(vc.GetTrustedCa().GetInlineBytes()), pemRoot) {
			return errBadRoot
		}
		return nil
	}
}

type testError string

func (e testError) Error() string { return string(e) }

const errBadRoot = testError("test proxy refuses this root")
