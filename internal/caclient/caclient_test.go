package caclient_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/keystore"
)

// testCA is a root and an intermediate for one trust domain. The
// intermediate signs both the leaves and the server's TLS certificate, as
// the real mesh CA does.
type testCA struct {
	td       spiffeid.TrustDomain
	root     *x509.Certificate
	inter    *x509.Certificate
	interKey crypto.Signer
}

func newKey(t testing.TB) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func createCert(t testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newSerial(t testing.TB) *big.Int {
	t.Helper()
	s, err := ca.NewSerial(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newTestCA(t *testing.T, td string) *testCA {
	t.Helper()
	trustDomain := spiffeid.RequireTrustDomainFromString(td)
	now := time.Now()
	rootKey, interKey := newKey(t), newKey(t)
	rootTmpl, err := ca.RootTemplate(trustDomain, rootKey.Public(), newSerial(t),
		ca.Validity{NotBefore: now.Add(-time.Minute), NotAfter: now.Add(48 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	root := createCert(t, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	interTmpl, err := ca.IntermediateTemplate(trustDomain, interKey.Public(), newSerial(t),
		ca.Validity{NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	inter := createCert(t, interTmpl, root, interKey.Public(), rootKey)
	return &testCA{td: trustDomain, root: root, inter: inter, interKey: interKey}
}

func (c *testCA) leaf(t testing.TB, pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration) *x509.Certificate {
	t.Helper()
	now := time.Now()
	tmpl, err := ca.LeafTemplate(id, pub, newSerial(t), ca.Validity{NotBefore: now.Add(-time.Minute), NotAfter: now.Add(ttl)})
	if err != nil {
		t.Fatal(err)
	}
	return createCert(t, tmpl, c.inter, pub, c.interKey)
}

// serving issues the server's TLS certificate, valid for localhost and
// 127.0.0.1 as in a dev deployment.
func (c *testCA) serving(t *testing.T) tls.Certificate {
	t.Helper()
	key := newKey(t)
	now := time.Now()
	tmpl, err := ca.ServingTemplate(spiffeid.RequireFromPath(c.td, "/meshca"), []string{"localhost"},
		[]net.IP{net.IPv4(127, 0, 0, 1)}, key.Public(), newSerial(t),
		ca.Validity{NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	cert := createCert(t, tmpl, c.inter, key.Public(), c.interKey)
	return tls.Certificate{Certificate: [][]byte{cert.Raw, c.inter.Raw}, PrivateKey: key, Leaf: cert}
}

func pemOf(certs ...*x509.Certificate) string { return string(ca.EncodeCerts(certs...)) }

// chainPEM is the response layout of Istio's CA API: leaf first, one PEM
// certificate per element, root last.
func (c *testCA) chainPEM(leaf *x509.Certificate) []string {
	return []string{pemOf(leaf), pemOf(c.inter), pemOf(c.root)}
}

// tokenID is the test's token scheme: the token "ns/sa" authenticates
// spiffe://<td>/ns/<ns>/sa/<sa>.
func tokenID(td spiffeid.TrustDomain, token string) (spiffeid.ID, error) {
	ns, sa, ok := strings.Cut(token, "/")
	if !ok || ns == "" || sa == "" {
		return spiffeid.ID{}, errors.New("token is not ns/sa")
	}
	return spiffeid.FromSegments(td, "ns", ns, "sa", sa)
}

// call is what the server saw of one request.
type call struct {
	md     metadata.MD
	req    *pb.IstioCertificateRequest
	csr    *x509.CertificateRequest
	csrErr error
}

// testServer implements Istio's CA API with a testCA. The optional hooks
// let a test make it misbehave.
type testServer struct {
	pb.UnimplementedIstioCertificateServiceServer
	issuer *testCA
	// err, when set, is returned instead of a certificate.
	err error
	// block makes the call wait for the client to give up.
	block bool
	// mutate rewrites the response chain; pub is the CSR's key.
	mutate func(t testing.TB, issuer *testCA, chain []string, pub crypto.PublicKey) []string
	t      *testing.T

	mu    sync.Mutex
	calls []call
}

// errHandlerFatal unwinds a handler whose test helper failed: t.Fatal must
// not run on a gRPC goroutine, so handlerTB reports the failure and panics
// with this value, and CreateCertificate recovers it.
var errHandlerFatal = errors.New("test server: helper failed")

type handlerTB struct{ testing.TB }

func (h handlerTB) Fatal(args ...any) {
	h.Error(args...)
	panic(errHandlerFatal)
}

func (h handlerTB) Fatalf(format string, args ...any) {
	h.Errorf(format, args...)
	panic(errHandlerFatal)
}

func (s *testServer) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (_ *pb.IstioCertificateResponse, err error) {
	defer func() {
		if r := recover(); r != nil {
			if r != errHandlerFatal {
				panic(r)
			}
			err = status.Error(codes.Internal, errHandlerFatal.Error())
		}
	}()
	t := handlerTB{s.t}
	md, _ := metadata.FromIncomingContext(ctx)
	csr, csrErr := ca.ParseCSR([]byte(req.GetCsr()))
	s.mu.Lock()
	s.calls = append(s.calls, call{md: md.Copy(), req: req, csr: csr, csrErr: csrErr})
	s.mu.Unlock()

	if s.err != nil {
		return nil, s.err
	}
	if s.block {
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	if csrErr != nil {
		return nil, status.Error(codes.InvalidArgument, csrErr.Error())
	}
	auth := md.Get("authorization")
	if len(auth) != 1 || !strings.HasPrefix(auth[0], "Bearer ") {
		return nil, status.Error(codes.Unauthenticated, "missing bearer token")
	}
	id, err := tokenID(s.issuer.td, strings.TrimPrefix(auth[0], "Bearer "))
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	ttl := time.Duration(req.GetValidityDuration()) * time.Second
	if ttl == 0 {
		ttl = time.Hour
	}
	chain := s.issuer.chainPEM(s.issuer.leaf(t, csr.PublicKey, id, ttl))
	if s.mutate != nil {
		chain = s.mutate(t, s.issuer, chain, csr.PublicKey)
	}
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

func (s *testServer) seen() []call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]call(nil), s.calls...)
}

// start serves s over TLS, with a certificate from tlsCA, on a loopback
// port and returns the address.
func (s *testServer) start(t *testing.T, tlsCA *testCA) string {
	t.Helper()
	s.t = t
	if s.issuer == nil {
		s.issuer = tlsCA
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{tlsCA.serving(t)},
		MinVersion:   tls.VersionTLS12,
	})))
	pb.RegisterIstioCertificateServiceServer(srv, s)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
	})
	return lis.Addr().String()
}

func newClient(t *testing.T, cfg caclient.Config) *caclient.Client {
	t.Helper()
	c, err := caclient.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// setup starts a well-behaved server and a client trusting its CA.
func setup(t *testing.T, srv *testServer, mod func(*caclient.Config)) (*testCA, *caclient.Client) {
	t.Helper()
	mesh := newTestCA(t, "example.org")
	addr := srv.start(t, mesh)
	cfg := caclient.Config{Address: addr, TrustBundle: []*x509.Certificate{mesh.root}}
	if mod != nil {
		mod(&cfg)
	}
	return mesh, newClient(t, cfg)
}

func TestFetch(t *testing.T) {
	srv := &testServer{}
	mesh, client := setup(t, srv, func(c *caclient.Config) { c.ClusterID = "cluster-1" })

	creds, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web", TTL: 30 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if want := "spiffe://example.org/ns/default/sa/web"; creds.ID.String() != want {
		t.Errorf("ID = %s, want %s", creds.ID, want)
	}
	if len(creds.Chain) != 2 || !creds.Chain[1].Equal(mesh.inter) {
		t.Fatalf("Chain = %d certs, want leaf and the intermediate", len(creds.Chain))
	}
	if !creds.Key.Public().(*ecdsa.PublicKey).Equal(creds.Chain[0].PublicKey) {
		t.Error("leaf does not certify the returned key")
	}
	if _, ok := creds.Key.(*ecdsa.PrivateKey); !ok {
		t.Errorf("default key is %T, want ECDSA", creds.Key)
	}
	if len(creds.Roots) != 1 || !creds.Roots[0].Equal(mesh.root) {
		t.Errorf("Roots = %d certs, want just the mesh root", len(creds.Roots))
	}
	if !creds.NotAfter.Equal(creds.Chain[0].NotAfter) {
		t.Errorf("NotAfter = %s, want the leaf's %s", creds.NotAfter, creds.Chain[0].NotAfter)
	}
	if d := time.Until(creds.NotAfter); d < 29*time.Minute || d > 31*time.Minute {
		t.Errorf("leaf expires in %s, want about the requested 30m", d)
	}

	calls := srv.seen()
	if len(calls) != 1 {
		t.Fatalf("server saw %d calls, want 1", len(calls))
	}
	got := calls[0]
	if a := got.md.Get("authorization"); len(a) != 1 || a[0] != "Bearer default/web" {
		t.Errorf("authorization metadata = %q, want the bearer token", a)
	}
	if c := got.md.Get("clusterid"); len(c) != 1 || c[0] != "cluster-1" {
		t.Errorf("clusterid metadata = %q, want cluster-1", c)
	}
	if got.req.GetValidityDuration() != 1800 {
		t.Errorf("validity_duration = %d, want 1800", got.req.GetValidityDuration())
	}
	if got.csrErr != nil {
		t.Fatalf("server could not parse the CSR: %v", got.csrErr)
	}
	if err := got.csr.CheckSignature(); err != nil {
		t.Errorf("CSR self-signature: %v", err)
	}
	if n := len(got.csr.URIs) + len(got.csr.DNSNames) + len(got.csr.IPAddresses) + len(got.csr.EmailAddresses); n != 0 {
		t.Errorf("CSR carries %d SANs, want none", n)
	}
	if len(got.csr.Extensions) != 0 {
		t.Errorf("CSR carries %d extensions, want none", len(got.csr.Extensions))
	}
	if !creds.Key.Public().(*ecdsa.PublicKey).Equal(got.csr.PublicKey) {
		t.Error("CSR key is not the returned key")
	}
}

func TestFetchNoClusterID(t *testing.T) {
	srv := &testServer{}
	_, client := setup(t, srv, nil)
	if _, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web"}); err != nil {
		t.Fatal(err)
	}
	got := srv.seen()[0]
	if c := got.md.Get("clusterid"); len(c) != 0 {
		t.Errorf("clusterid metadata = %q, want none when not configured", c)
	}
	if got.req.GetValidityDuration() != 0 {
		t.Errorf("validity_duration = %d, want 0 (server default)", got.req.GetValidityDuration())
	}
}

func TestFetchKeyTypes(t *testing.T) {
	srv := &testServer{}
	_, client := setup(t, srv, nil)
	// RSA-3072/4096 are left out only because generating them under -race
	// is slow; they take the same path as RSA-2048.
	for _, kt := range []keystore.KeyType{keystore.ECDSAP256, keystore.ECDSAP384, keystore.RSA2048} {
		t.Run(string(kt), func(t *testing.T) {
			creds, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web", KeyType: kt})
			if err != nil {
				t.Fatal(err)
			}
			switch k := creds.Key.(type) {
			case *ecdsa.PrivateKey:
				if !k.PublicKey.Equal(creds.Chain[0].PublicKey) {
					t.Error("key mismatch")
				}
			case *rsa.PrivateKey:
				if kt != keystore.RSA2048 || k.N.BitLen() != 2048 {
					t.Errorf("got RSA-%d for %s", k.N.BitLen(), kt)
				}
			default:
				t.Errorf("key type %T", k)
			}
		})
	}
}

func TestFetchNotAfterIsEarliestInChain(t *testing.T) {
	srv := &testServer{}
	mesh, client := setup(t, srv, nil)
	// The test CA, like a careless one, signs past its own expiry; the
	// credentials are only good until the intermediate expires.
	creds, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web", TTL: 100 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !creds.NotAfter.Equal(mesh.inter.NotAfter) {
		t.Errorf("NotAfter = %s, want the intermediate's %s", creds.NotAfter, mesh.inter.NotAfter)
	}
}

func TestWrite(t *testing.T) {
	_, client := setup(t, &testServer{}, nil)
	creds, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web"})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "a", "certs")
	if err := creds.Write(dir); err != nil {
		t.Fatal(err)
	}
	// Twice: replacing existing files must work too.
	if err := creds.Write(dir); err != nil {
		t.Fatal(err)
	}

	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("dir mode = %o, want 700", fi.Mode().Perm())
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := "cert-chain.pem key.pem root-cert.pem"; strings.Join(names, " ") != want {
		t.Errorf("dir holds %q, want %q", names, want)
	}
	for name, want := range map[string]os.FileMode{
		caclient.KeyFile: 0o600, caclient.ChainFile: 0o644, caclient.RootFile: 0o644,
	} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s mode = %o, want %o", name, fi.Mode().Perm(), want)
		}
	}

	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	keyPEM, chainPEM := read(caclient.KeyFile), read(caclient.ChainFile)
	block, rest := pem.Decode(keyPEM)
	if block == nil || block.Type != "PRIVATE KEY" || len(bytes.TrimSpace(rest)) != 0 {
		t.Fatalf("key.pem is not a single PKCS#8 PRIVATE KEY block")
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !key.(*ecdsa.PrivateKey).Equal(creds.Key) {
		t.Error("key.pem holds a different key")
	}
	chain, err := ca.ParseCerts(chainPEM)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != len(creds.Chain) || !chain[0].Equal(creds.Chain[0]) || !chain[1].Equal(creds.Chain[1]) {
		t.Error("cert-chain.pem differs from Chain")
	}
	roots, err := caclient.LoadBundle(filepath.Join(dir, caclient.RootFile))
	if err != nil {
		t.Fatal(err)
	}
	if len(roots) != 1 || !roots[0].Equal(creds.Roots[0]) {
		t.Error("root-cert.pem differs from Roots")
	}
	// The pair must load the way any TLS stack would load it.
	if _, err := tls.X509KeyPair(chainPEM, keyPEM); err != nil {
		t.Errorf("written files are not a usable key pair: %v", err)
	}
}

func TestWriteKeepsExistingDirMode(t *testing.T) {
	_, client := setup(t, &testServer{}, nil)
	creds, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web"})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := creds.Write(dir); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("existing dir mode changed: %v %v", fi.Mode(), err)
	}
}

// spiffeTLS configures one end of an mTLS connection the SPIFFE way: chains
// are verified against the bundle and the peer's SPIFFE ID is recorded,
// instead of matching host names, which X.509-SVIDs do not carry.
func spiffeTLS(creds *caclient.Credentials, peer *spiffeid.ID) *tls.Config {
	bundle := x509bundle.FromX509Authorities(creds.ID.TrustDomain(), creds.Roots)
	return &tls.Config{
		Certificates:       []tls.Certificate{creds.TLSCertificate()},
		ClientAuth:         tls.RequireAnyClientCert,
		InsecureSkipVerify: true, // replaced by VerifyPeerCertificate below
		MinVersion:         tls.VersionTLS13,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, _, err := x509svid.ParseAndVerify(raw, bundle)
			*peer = id
			return err
		},
	}
}

func TestTLSCertificateHandshake(t *testing.T) {
	_, client := setup(t, &testServer{}, nil)
	web, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web"})
	if err != nil {
		t.Fatal(err)
	}
	db, err := client.Fetch(context.Background(), caclient.Request{Token: "data/db", KeyType: keystore.RSA2048})
	if err != nil {
		t.Fatal(err)
	}

	var clientSaw, serverSaw spiffeid.ID
	c1, c2 := net.Pipe()
	tlsClient := tls.Client(c1, spiffeTLS(web, &clientSaw))
	tlsServer := tls.Server(c2, spiffeTLS(db, &serverSaw))
	// Close the pipe, not the TLS conns: tls.Conn.Close writes a
	// close_notify that an unbuffered pipe holds until nobody reads it.
	// Closing the pipe also frees the server goroutine if the client fails.
	defer c1.Close()
	defer c2.Close()

	serverDone := make(chan error, 1)
	go func() {
		if err := tlsServer.Handshake(); err != nil {
			serverDone <- err
			return
		}
		buf := make([]byte, 4)
		if _, err := tlsServer.Read(buf); err != nil {
			serverDone <- err
			return
		}
		_, err := tlsServer.Write(buf)
		serverDone <- err
	}()
	if err := tlsClient.Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if _, err := tlsClient.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := tlsClient.Read(buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo = %q, %v", buf, err)
	}
	if err := <-serverDone; err != nil {
		t.Fatalf("server: %v", err)
	}
	if clientSaw != db.ID {
		t.Errorf("client saw peer %s, want %s", clientSaw, db.ID)
	}
	if serverSaw != web.ID {
		t.Errorf("server saw peer %s, want %s", serverSaw, web.ID)
	}
}

func TestUntrustedChain(t *testing.T) {
	// other shares the trust domain, so only the keys tell it apart.
	other := newTestCA(t, "example.org")
	web := spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web")
	tests := []struct {
		name   string
		mutate func(t testing.TB, issuer *testCA, chain []string, pub crypto.PublicKey) []string
	}{
		{"other CA vouching for itself", func(t testing.TB, _ *testCA, _ []string, pub crypto.PublicKey) []string {
			return other.chainPEM(other.leaf(t, pub, web, time.Hour))
		}},
		{"other CA with our root appended", func(t testing.TB, _ *testCA, chain []string, pub crypto.PublicKey) []string {
			c := other.chainPEM(other.leaf(t, pub, web, time.Hour))
			return []string{c[0], c[1], chain[2]}
		}},
		{"leaf for another key", func(t testing.TB, issuer *testCA, _ []string, _ crypto.PublicKey) []string {
			return issuer.chainPEM(issuer.leaf(t, newKey(t).Public(), web, time.Hour))
		}},
		{"leaf without its intermediate", func(_ testing.TB, _ *testCA, chain []string, _ crypto.PublicKey) []string {
			return []string{chain[0], chain[2]}
		}},
		{"leaf without SPIFFE ID", func(t testing.TB, issuer *testCA, chain []string, pub crypto.PublicKey) []string {
			tmpl := &x509.Certificate{
				SerialNumber: newSerial(t), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
				DNSNames: []string{"web.example.org"}, KeyUsage: x509.KeyUsageDigitalSignature,
			}
			return []string{pemOf(createCert(t, tmpl, issuer.inter, pub, issuer.interKey)), chain[1], chain[2]}
		}},
		{"CA certificate as leaf", func(_ testing.TB, _ *testCA, chain []string, _ crypto.PublicKey) []string {
			return []string{chain[1], chain[2], chain[2]}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := &testServer{mutate: tc.mutate}
			_, client := setup(t, srv, nil)
			creds, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web"})
			if !errors.Is(err, caclient.ErrUntrustedChain) {
				t.Fatalf("Fetch = %v, %v; want ErrUntrustedChain", creds, err)
			}
			if errors.Is(err, caclient.ErrMalformedChain) {
				t.Errorf("untrusted chain also reported as malformed: %v", err)
			}
			if !strings.HasPrefix(err.Error(), "caclient: ") {
				t.Errorf("error %q lacks the caclient prefix", err)
			}
		})
	}
}

func TestMalformedChain(t *testing.T) {
	keyPEM := func(t testing.TB) string {
		der, err := x509.MarshalPKCS8PrivateKey(newKey(t))
		if err != nil {
			t.Fatal(err)
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	}
	tests := []struct {
		name   string
		mutate func(t testing.TB, issuer *testCA, chain []string, pub crypto.PublicKey) []string
		want   string
	}{
		{"empty", func(testing.TB, *testCA, []string, crypto.PublicKey) []string { return nil },
			"no certificates"},
		{"single element", func(_ testing.TB, _ *testCA, chain []string, _ crypto.PublicKey) []string { return chain[:1] },
			"single certificate"},
		{"two certificates in one element", func(_ testing.TB, _ *testCA, chain []string, _ crypto.PublicKey) []string {
			return []string{chain[0] + chain[1], chain[2]}
		}, "element 0 holds 2 certificates"},
		{"garbage", func(_ testing.TB, _ *testCA, chain []string, _ crypto.PublicKey) []string {
			return []string{chain[0], "not a certificate", chain[2]}
		}, "element 1"},
		{"empty element", func(_ testing.TB, _ *testCA, chain []string, _ crypto.PublicKey) []string {
			return []string{chain[0], chain[1], ""}
		}, "element 2"},
		{"trailing garbage", func(_ testing.TB, _ *testCA, chain []string, _ crypto.PublicKey) []string {
			return []string{chain[0] + "junk", chain[1], chain[2]}
		}, "element 0"},
		{"corrupt DER", func(_ testing.TB, _ *testCA, chain []string, _ crypto.PublicKey) []string {
			return []string{chain[0], string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{0x30, 0x03, 1, 2, 3}})), chain[2]}
		}, "element 1"},
		{"private key instead of certificate", func(t testing.TB, _ *testCA, chain []string, _ crypto.PublicKey) []string {
			return []string{chain[0], chain[1], keyPEM(t)}
		}, `"PRIVATE KEY"`},
		{"unknown leaf in root position", func(t testing.TB, issuer *testCA, chain []string, _ crypto.PublicKey) []string {
			// The chain itself verifies; only the claimed root is bogus,
			// and it must not end up in root-cert.pem.
			stranger := issuer.leaf(t, newKey(t).Public(), spiffeid.RequireFromString("spiffe://example.org/x"), time.Hour)
			return []string{chain[0], chain[1], pemOf(stranger)}
		}, "not a CA"},
		{"intermediate in root position", func(_ testing.TB, _ *testCA, chain []string, _ crypto.PublicKey) []string {
			return []string{chain[0], chain[1], chain[1]}
		}, "not self-signed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := &testServer{mutate: tc.mutate}
			_, client := setup(t, srv, nil)
			creds, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web"})
			if !errors.Is(err, caclient.ErrMalformedChain) {
				t.Fatalf("Fetch = %v, %v; want ErrMalformedChain", creds, err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
			if errors.Is(err, caclient.ErrUntrustedChain) {
				t.Errorf("malformed chain also reported as untrusted: %v", err)
			}
		})
	}
}

func TestServedRootRotation(t *testing.T) {
	// During a root rotation the server may announce a root the client does
	// not trust yet, while the chain still verifies against the old one.
	next := newTestCA(t, "example.org")
	srv := &testServer{mutate: func(_ testing.TB, _ *testCA, chain []string, _ crypto.PublicKey) []string {
		return []string{chain[0], chain[1], pemOf(next.root)}
	}}
	mesh, client := setup(t, srv, func(c *caclient.Config) {
		// Duplicates in the configured bundle must not reach the output.
		c.TrustBundle = append(c.TrustBundle, c.TrustBundle[0])
	})
	creds, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web"})
	if err != nil {
		t.Fatal(err)
	}
	if len(creds.Roots) != 2 || !creds.Roots[0].Equal(mesh.root) || !creds.Roots[1].Equal(next.root) {
		t.Errorf("Roots = %d certs, want the configured root then the served one", len(creds.Roots))
	}
}

func TestServerErrorPreserved(t *testing.T) {
	srv := &testServer{err: status.Error(codes.Unauthenticated, "token expired at 12:00")}
	_, client := setup(t, srv, nil)
	_, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web"})
	if err == nil {
		t.Fatal("Fetch succeeded")
	}
	if !strings.HasPrefix(err.Error(), "caclient: ") {
		t.Errorf("error %q lacks the caclient prefix", err)
	}
	if got := status.Code(err); got != codes.Unauthenticated {
		t.Errorf("status.Code = %s, want Unauthenticated (err: %v)", got, err)
	}
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.Unauthenticated || !strings.Contains(st.Message(), "token expired at 12:00") {
		t.Errorf("status.FromError = %v, %v", st, ok)
	}
	// The server's own status, message untouched, is reachable through
	// the wrapping.
	var gs interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &gs) || gs.GRPCStatus().Message() != "token expired at 12:00" {
		t.Errorf("server status not reachable via errors.As: %v", err)
	}
	if errors.Is(err, caclient.ErrUntrustedChain) || errors.Is(err, caclient.ErrMalformedChain) {
		t.Errorf("server error mistaken for a chain problem: %v", err)
	}
}

func TestServerRejectsToken(t *testing.T) {
	// The test server's own token check, end to end: the code comes back
	// from the real handler rather than a canned error.
	_, client := setup(t, &testServer{}, nil)
	_, err := client.Fetch(context.Background(), caclient.Request{Token: "not-ns-sa"})
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "token is not ns/sa") {
		t.Errorf("Fetch error = %v, want Unauthenticated from the server", err)
	}
}

func TestTimeout(t *testing.T) {
	srv := &testServer{block: true}
	_, client := setup(t, srv, func(c *caclient.Config) { c.Timeout = 100 * time.Millisecond })
	_, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web"})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("Fetch error = %v, want DeadlineExceeded", err)
	}
}

func TestCallerContextCancelled(t *testing.T) {
	_, client := setup(t, &testServer{}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := client.Fetch(ctx, caclient.Request{Token: "default/web"})
	if status.Code(err) != codes.Canceled {
		t.Errorf("Fetch error = %v, want Canceled", err)
	}
}

func TestServerTLS(t *testing.T) {
	mesh := newTestCA(t, "example.org")
	stranger := newTestCA(t, "example.org")
	tests := []struct {
		name       string
		serverCA   *testCA
		serverName string
		bundle     []*x509.Certificate
		wantErr    string
	}{
		{name: "server name override", serverCA: mesh, serverName: "localhost", bundle: []*x509.Certificate{mesh.root}},
		{name: "wrong server name", serverCA: mesh, serverName: "meshca.wrong.example", bundle: []*x509.Certificate{mesh.root}, wantErr: "meshca.wrong.example"},
		{name: "server certificate from untrusted CA", serverCA: stranger, bundle: []*x509.Certificate{mesh.root}, wantErr: "unknown authority"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := &testServer{issuer: mesh}
			addr := srv.start(t, tc.serverCA)
			client := newClient(t, caclient.Config{Address: addr, TrustBundle: tc.bundle, ServerName: tc.serverName})
			_, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web"})
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Fetch error = %v, want one mentioning %q", err, tc.wantErr)
			}
			if status.Code(err) != codes.Unavailable {
				t.Errorf("status.Code = %s, want Unavailable", status.Code(err))
			}
			// The token must never reach a server we could not
			// authenticate.
			if n := len(srv.seen()); n != 0 {
				t.Errorf("unauthenticated server received %d requests", n)
			}
		})
	}
}

func TestNewValidates(t *testing.T) {
	root := newTestCA(t, "example.org").root
	tests := []struct {
		name string
		cfg  caclient.Config
		want string
	}{
		{"no address", caclient.Config{TrustBundle: []*x509.Certificate{root}}, "no server address"},
		{"no bundle", caclient.Config{Address: "127.0.0.1:1"}, "empty trust bundle"},
		{"nil in bundle", caclient.Config{Address: "127.0.0.1:1", TrustBundle: []*x509.Certificate{root, nil}}, "entry 1 is nil"},
		{"negative timeout", caclient.Config{Address: "127.0.0.1:1", TrustBundle: []*x509.Certificate{root}, Timeout: -time.Second}, "negative timeout"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := caclient.New(tc.cfg)
			if err == nil {
				c.Close()
				t.Fatal("New succeeded")
			}
			if !strings.HasPrefix(err.Error(), "caclient: ") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New error = %q, want caclient: ...%s", err, tc.want)
			}
		})
	}
}

func TestNewIsLazy(t *testing.T) {
	root := newTestCA(t, "example.org").root
	var dials atomic.Int32
	c, err := caclient.New(caclient.Config{
		Address:     "meshca.invalid:15012",
		TrustBundle: []*x509.Certificate{root},
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			dials.Add(1)
			return nil, errors.New("test dialer: no network")
		})},
	})
	if err != nil {
		t.Fatal(err)
	}
	if n := dials.Load(); n != 0 {
		t.Errorf("New dialled %d times, want 0", n)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if n := dials.Load(); n != 0 {
		t.Errorf("New+Close dialled %d times, want 0", n)
	}
}

func TestFetchValidatesRequest(t *testing.T) {
	srv := &testServer{}
	_, client := setup(t, srv, nil)
	tests := []struct {
		name string
		req  caclient.Request
		is   error
		want string
	}{
		{"no token", caclient.Request{}, nil, "no token"},
		{"negative TTL", caclient.Request{Token: "default/web", TTL: -time.Second}, nil, "negative TTL"},
		{"unknown key type", caclient.Request{Token: "default/web", KeyType: "ed448"}, keystore.ErrUnsupportedKeyType, "ed448"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := client.Fetch(context.Background(), tc.req)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Fetch error = %v, want one mentioning %q", err, tc.want)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("Fetch error = %v, want errors.Is %v", err, tc.is)
			}
		})
	}
	if n := len(srv.seen()); n != 0 {
		t.Errorf("invalid requests reached the server %d times", n)
	}
}

func TestTTLRoundsUp(t *testing.T) {
	srv := &testServer{}
	_, client := setup(t, srv, nil)
	if _, err := client.Fetch(context.Background(), caclient.Request{Token: "default/web", TTL: 90*time.Second + time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	if got := srv.seen()[0].req.GetValidityDuration(); got != 91 {
		t.Errorf("validity_duration = %d, want 91", got)
	}
}

func TestLoadBundle(t *testing.T) {
	a, b := newTestCA(t, "example.org"), newTestCA(t, "example.org")
	dir := t.TempDir()
	good := filepath.Join(dir, "roots.pem")
	if err := os.WriteFile(good, ca.EncodeCerts(a.root, b.root), 0o644); err != nil {
		t.Fatal(err)
	}
	roots, err := caclient.LoadBundle(good)
	if err != nil {
		t.Fatal(err)
	}
	if len(roots) != 2 || !roots[0].Equal(a.root) || !roots[1].Equal(b.root) {
		t.Errorf("LoadBundle returned %d certs, want both roots in order", len(roots))
	}

	for name, data := range map[string][]byte{
		"empty.pem":   nil,
		"garbage.pem": []byte("hello"),
		"key.pem":     pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1}}),
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := caclient.LoadBundle(p); err == nil || !strings.Contains(err.Error(), p) {
			t.Errorf("LoadBundle(%s) = %v, want an error naming the file", name, err)
		}
	}
	if _, err := caclient.LoadBundle(filepath.Join(dir, "missing.pem")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("LoadBundle(missing) = %v, want ErrNotExist", err)
	}
}
