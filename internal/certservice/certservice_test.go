package certservice_test

import (
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
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/devtoken"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/certservice"
	"github.com/meshca/meshca/internal/server"
)

var (
	quiet = slog.New(slog.DiscardHandler)
	td    = spiffeid.RequireTrustDomainFromString("cluster.local")
	web   = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/web")
)

// harness is a real meshca server on a loopback port with a raw Istio CA
// client, so tests can send requests no well-behaved client would.
type harness struct {
	clock    *clockwork.FakeClock
	tokens   *devtoken.Authority
	client   pb.IstioCertificateServiceClient
	registry *prometheus.Registry
	bundle   *ca.Issuer
	authn    identity.Authenticator
	issuer   certservice.Issuer
	ledger   certservice.Recorder
	records  *audit.Ledger // the real ledger, unless an option replaced it
}

type option func(*harness)

func withAuthenticator(a identity.Authenticator) option { return func(h *harness) { h.authn = a } }
func withIssuer(i certservice.Issuer) option            { return func(h *harness) { h.issuer = i } }

func newHarness(t *testing.T, opts ...option) *harness {
	t.Helper()
	// Start at the real time (TLS handshakes check validity against the
	// wall clock), whole seconds as certificates record them.
	h := &harness{clock: clockwork.NewFakeClockAt(time.Now().Truncate(time.Second)), registry: prometheus.NewRegistry()}
	var err error
	h.tokens, err = devtoken.New(devtoken.Config{KeyFile: filepath.Join(t.TempDir(), "k.pem"), TrustDomain: td, Clock: h.clock, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	authority := catest.NewAuthority(t, h.clock)
	h.bundle = authority.Issuer()
	h.authn, h.issuer = h.tokens, authority
	h.records = startLedger(t, audit.Config{Dir: filepath.Join(t.TempDir(), "audit"), Clock: h.clock})
	h.ledger = h.records
	for _, o := range opts {
		o(h)
	}
	svc, err := certservice.New(certservice.Config{Authenticator: h.authn, Issuer: h.issuer, Ledger: h.ledger, Metrics: h.registry})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(server.Config{
		GRPCAddr: "127.0.0.1:0", MonitorAddr: "127.0.0.1:0", CA: authority,
		ServerID: spiffeid.RequireFromString("spiffe://cluster.local/ns/meshca-system/sa/meshca"),
		IPs:      []net.IP{net.IPv4(127, 0, 0, 1)}, Services: []server.Service{svc},
		MaxRecvMsgSize: certservice.MaxRequestBytes,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	roots := x509.NewCertPool()
	for _, r := range h.bundle.Roots {
		roots.AddCert(r)
	}
	conn, err := grpc.NewClient(srv.GRPCAddr(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	h.client = pb.NewIstioCertificateServiceClient(conn)
	return h
}

// startLedger runs a real audit ledger until the test ends.
func startLedger(t *testing.T, cfg audit.Config) *audit.Ledger {
	t.Helper()
	l, err := audit.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		l.Close()
	})
	return l
}

// recorded returns the ledger's records of kind.
func (h *harness) recorded(t *testing.T, kind audit.Kind) []audit.Record {
	t.Helper()
	var out []audit.Record
	for r, err := range h.records.Query(context.Background(), audit.Filter{Kinds: []audit.Kind{kind}}) {
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func (h *harness) token(t *testing.T, req devtoken.MintRequest) string {
	t.Helper()
	if req.Namespace == "" {
		req.Namespace, req.ServiceAccount = "default", "web"
	}
	tok, err := h.tokens.Mint(req)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func (h *harness) call(md metadata.MD, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return h.client.CreateCertificate(metadata.NewOutgoingContext(ctx, md), req)
}

func bearer(tok string) metadata.MD { return metadata.Pairs("authorization", "Bearer "+tok) }

func csr(t *testing.T, key crypto.Signer, tmpl *x509.CertificateRequest) string {
	t.Helper()
	if tmpl == nil {
		tmpl = &x509.CertificateRequest{}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func p256(t *testing.T) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestIssuesChainLeafFirstRootLast(t *testing.T) {
	h := newHarness(t)
	resp, err := h.call(bearer(h.token(t, devtoken.MintRequest{})), &pb.IstioCertificateRequest{Csr: csr(t, p256(t), nil), ValidityDuration: 7200})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.CertChain) != 3 {
		t.Fatalf("chain has %d elements, want leaf, intermediate, root", len(resp.CertChain))
	}
	var certs []*x509.Certificate
	for i, elem := range resp.CertChain {
		cs, err := ca.ParseCerts([]byte(elem))
		if err != nil || len(cs) != 1 {
			t.Fatalf("element %d: %d certificates, err %v; want exactly one", i, len(cs), err)
		}
		certs = append(certs, cs[0])
	}
	if !certs[2].Equal(h.bundle.Roots[0]) {
		t.Error("last element is not the root")
	}
	id, _, err := x509svid.Verify(certs[:2], x509svidBundle(h))
	if err != nil || id != web {
		t.Fatalf("verify: id=%s err=%v", id, err)
	}
	if ttl := certs[0].NotAfter.Sub(h.clock.Now()); ttl != 2*time.Hour {
		t.Errorf("leaf lifetime %s, want the requested 2h", ttl)
	}
	if got := requests(t, h, "issued", ""); got != 1 {
		t.Errorf("issued counter = %v, want 1", got)
	}
	recs := h.recorded(t, audit.KindIssued)
	if len(recs) != 1 {
		t.Fatalf("%d issuance records, want 1", len(recs))
	}
	r := recs[0]
	want := audit.Record{Serial: certs[0].SerialNumber.Text(16), SPIFFEID: web.String(), Namespace: "default", ServiceAccount: "web",
		KeyType: "ecdsa-p256", KeyFingerprint: audit.KeyFingerprint(certs[0]), NotBefore: certs[0].NotBefore, NotAfter: certs[0].NotAfter,
		IssuerFingerprint: ca.Fingerprint(certs[1]), RootFingerprint: ca.Fingerprint(certs[2])}
	got := audit.Record{Serial: r.Serial, SPIFFEID: r.SPIFFEID, Namespace: r.Namespace, ServiceAccount: r.ServiceAccount,
		KeyType: r.KeyType, KeyFingerprint: r.KeyFingerprint, NotBefore: r.NotBefore, NotAfter: r.NotAfter,
		IssuerFingerprint: r.IssuerFingerprint, RootFingerprint: r.RootFingerprint}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("issuance record\n got %+v\nwant %+v", got, want)
	}
	if len(r.TokenHash) != 32 || !strings.HasPrefix(r.Peer, "127.0.0.1:") {
		t.Errorf("token hash %q, peer %q", r.TokenHash, r.Peer)
	}
}

func TestRejections(t *testing.T) {
	h := newHarness(t)
	other, err := devtoken.New(devtoken.Config{TrustDomain: td, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	forged, _ := other.Mint(devtoken.MintRequest{Namespace: "kube-system", ServiceAccount: "admin"})
	good := h.token(t, devtoken.MintRequest{})
	wrongAud := h.token(t, devtoken.MintRequest{Audiences: []string{"vault"}})
	short := h.token(t, devtoken.MintRequest{TTL: time.Minute})
	key := p256(t)
	rsa1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	valid := csr(t, key, nil)
	badSig := func() string {
		b, _ := pem.Decode([]byte(valid))
		b.Bytes[len(b.Bytes)-2] ^= 0x55
		return string(pem.EncodeToMemory(b))
	}()
	impersonate, _ := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": "spiffe://cluster.local/ns/x/sa/y"})

	tests := []struct {
		name   string
		md     metadata.MD
		req    *pb.IstioCertificateRequest
		before func()
		code   codes.Code
		msg    string
		reason string
	}{
		{name: "no token", md: metadata.MD{}, req: &pb.IstioCertificateRequest{Csr: valid},
			code: codes.Unauthenticated, msg: `no bearer token in the "authorization" metadata`, reason: "missing-token"},
		{name: "basic auth", md: metadata.Pairs("authorization", "Basic dXNlcjpwYXNz"), req: &pb.IstioCertificateRequest{Csr: valid},
			code: codes.Unauthenticated, msg: "no bearer token", reason: "missing-token"},
		{name: "two tokens", md: metadata.Pairs("authorization", "Bearer "+good, "authorization", "Bearer "+good), req: &pb.IstioCertificateRequest{Csr: valid},
			code: codes.Unauthenticated, msg: "no bearer token", reason: "missing-token"},
		{name: "forged token", md: bearer(forged), req: &pb.IstioCertificateRequest{Csr: valid},
			code: codes.Unauthenticated, msg: "invalid-token", reason: "invalid-token"},
		{name: "garbage token", md: bearer("not.a.jwt"), req: &pb.IstioCertificateRequest{Csr: valid},
			code: codes.Unauthenticated, msg: "invalid-token", reason: "invalid-token"},
		{name: "wrong audience", md: bearer(wrongAud), req: &pb.IstioCertificateRequest{Csr: valid},
			code: codes.Unauthenticated, msg: "wrong-audience", reason: "wrong-audience"},
		{name: "unknown cluster", md: metadata.Pairs("authorization", "Bearer "+good, "ClusterID", "east"), req: &pb.IstioCertificateRequest{Csr: valid},
			code: codes.Unauthenticated, msg: "unknown-cluster", reason: "unknown-cluster"},
		{name: "expired token", md: bearer(short), req: &pb.IstioCertificateRequest{Csr: valid}, before: func() { h.clock.Advance(2 * time.Minute) },
			code: codes.Unauthenticated, msg: "expired-token", reason: "expired-token"},
		{name: "CSR too large", md: bearer(good), req: &pb.IstioCertificateRequest{Csr: strings.Repeat("A", ca.MaxCSRBytes+1)},
			code: codes.InvalidArgument, msg: "invalid CSR: CSR is 16385 bytes, limit is 16384", reason: "csr-too-large"},
		{name: "CSR garbage", md: bearer(good), req: &pb.IstioCertificateRequest{Csr: "hello"},
			code: codes.InvalidArgument, msg: "invalid CSR: no PEM CERTIFICATE REQUEST block found", reason: "csr-malformed"},
		{name: "CSR empty", md: bearer(good), req: &pb.IstioCertificateRequest{},
			code: codes.InvalidArgument, msg: "invalid CSR: no PEM", reason: "csr-malformed"},
		{name: "CSR bad signature", md: bearer(good), req: &pb.IstioCertificateRequest{Csr: badSig},
			code: codes.InvalidArgument, msg: "self-signature does not verify", reason: "csr-bad-signature"},
		{name: "CSR RSA-1024", md: bearer(good), req: &pb.IstioCertificateRequest{Csr: csr(t, rsa1024, nil)},
			code: codes.InvalidArgument, msg: "RSA key of 1024 bits not allowed", reason: "csr-key-type"},
		{name: "CSR P-224", md: bearer(good), req: &pb.IstioCertificateRequest{Csr: csr(t, p224, nil)},
			code: codes.InvalidArgument, msg: "ECDSA curve P-224 not allowed", reason: "csr-key-type"},
		{name: "CSR other identity", md: bearer(good), req: &pb.IstioCertificateRequest{Csr: csr(t, key, &x509.CertificateRequest{URIs: []*url.URL{{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/kube-system/sa/admin"}}})},
			code: codes.InvalidArgument, msg: `CSR asks for "spiffe://cluster.local/ns/kube-system/sa/admin" but the caller is authenticated as "spiffe://cluster.local/ns/default/sa/web"`, reason: "csr-identity-mismatch"},
		{name: "CSR DNS SAN", md: bearer(good), req: &pb.IstioCertificateRequest{Csr: csr(t, key, &x509.CertificateRequest{DNSNames: []string{"web.default.svc"}})},
			code: codes.InvalidArgument, msg: "CSR asks for 1 DNS/IP/email SANs", reason: "csr-unsupported-san"},
		{name: "negative validity", md: bearer(good), req: &pb.IstioCertificateRequest{Csr: valid, ValidityDuration: -1},
			code: codes.InvalidArgument, msg: "validity_duration must not be negative", reason: "bad-ttl"},
		{name: "impersonation", md: bearer(good), req: &pb.IstioCertificateRequest{Csr: valid, Metadata: impersonate},
			code: codes.PermissionDenied, msg: "impersonation (ImpersonatedIdentity) is not supported", reason: "impersonation"},
		{name: "oversized message", md: bearer(good), req: &pb.IstioCertificateRequest{Csr: strings.Repeat("A", certservice.MaxRequestBytes)},
			code: codes.ResourceExhausted, msg: "larger than max"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.before != nil {
				tc.before()
			}
			before := 0.0
			if tc.reason != "" {
				before = requests(t, h, "denied", tc.reason)
			}
			denials := len(h.recorded(t, audit.KindDenied))
			_, err := h.call(tc.md, tc.req)
			st := status.Convert(err)
			if st.Code() != tc.code || !strings.Contains(st.Message(), tc.msg) {
				t.Fatalf("got %s %q, want %s containing %q", st.Code(), st.Message(), tc.code, tc.msg)
			}
			if strings.Contains(st.Message(), good) {
				t.Fatal("the error message contains the token")
			}
			if tc.reason != "" {
				if got := requests(t, h, "denied", tc.reason); got != before+1 {
					t.Errorf("denied{reason=%q} went from %v to %v, want +1", tc.reason, before, got)
				}
			}
			recs := h.recorded(t, audit.KindDenied)
			if tc.reason == "" {
				// Refused by gRPC before the service saw it.
				if len(recs) != denials {
					t.Errorf("%d denial records for a message gRPC refused", len(recs)-denials)
				}
				return
			}
			if len(recs) != denials+1 {
				t.Fatalf("%d new denial records, want exactly 1", len(recs)-denials)
			}
			r := recs[len(recs)-1]
			wantClaim := ""
			if tc.code != codes.Unauthenticated {
				wantClaim = web.String() // authenticated, then refused
			}
			if r.Reason != tc.reason || r.ClaimedID != wantClaim || !strings.HasPrefix(r.Peer, "127.0.0.1:") || r.Detail == "" || strings.Contains(r.Detail, good) {
				t.Errorf("denial record %+v, want reason %q, claimed ID %q, a peer and a detail without the token", r, tc.reason, wantClaim)
			}
		})
	}
	if got := requests(t, h, "issued", ""); got != 0 {
		t.Errorf("issued %v certificates for bad requests", got)
	}
}

// authnFunc adapts a function to identity.Authenticator: the narrow seam
// for failures a real token authority produces only when it is down.
type authnFunc func(context.Context, identity.Credential) (identity.Caller, error)

func (f authnFunc) Authenticate(ctx context.Context, c identity.Credential) (identity.Caller, error) {
	return f(ctx, c)
}

type issuerFunc func(context.Context, ca.Request) (*ca.Issued, error)

func (f issuerFunc) Issue(ctx context.Context, r ca.Request) (*ca.Issued, error) { return f(ctx, r) }

func TestUnavailableAndInternalErrors(t *testing.T) {
	tests := []struct {
		name string
		opt  option
		code codes.Code
		msg  string
	}{
		{"token authority down", withAuthenticator(authnFunc(func(context.Context, identity.Credential) (identity.Caller, error) {
			return identity.Caller{}, identity.Deny(identity.ReasonUnavailable, "dial tcp 10.0.0.1:443: connection refused")
		})), codes.Unavailable, "cannot verify the token right now; retry"},
		{"authenticator bug fails closed", withAuthenticator(authnFunc(func(context.Context, identity.Credential) (identity.Caller, error) {
			return identity.Caller{}, errors.New("boom")
		})), codes.Internal, "internal error; see the CA's log"},
		{"CA not ready", withIssuer(issuerFunc(func(context.Context, ca.Request) (*ca.Issued, error) {
			return nil, ca.ErrNotReady
		})), codes.Unavailable, "CA is not ready; retry"},
		{"foreign trust domain", withIssuer(issuerFunc(func(context.Context, ca.Request) (*ca.Issued, error) {
			return nil, ca.ErrForeignTrustDomain
		})), codes.PermissionDenied, "identity is outside this CA's trust domain"},
		{"internal failure is opaque", withIssuer(issuerFunc(func(context.Context, ca.Request) (*ca.Issued, error) {
			return nil, errors.New("keystore: /secret/path: disk on fire")
		})), codes.Internal, "internal error; see the CA's log"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, tc.opt)
			_, err := h.call(bearer(h.token(t, devtoken.MintRequest{})), &pb.IstioCertificateRequest{Csr: csr(t, p256(t), nil)})
			st := status.Convert(err)
			if st.Code() != tc.code || st.Message() != tc.msg {
				t.Fatalf("got %s %q, want %s %q", st.Code(), st.Message(), tc.code, tc.msg)
			}
			if strings.Contains(st.Message(), "disk on fire") || strings.Contains(st.Message(), "10.0.0.1") {
				t.Fatal("internal detail leaked to the caller")
			}
		})
	}
}

// requests reads meshca_certificate_requests_total{result, reason}.
func requests(t *testing.T, h *harness, result, reason string) float64 {
	t.Helper()
	mfs, err := h.registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "meshca_certificate_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["result"] == result && labels["reason"] == reason {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func x509svidBundle(h *harness) *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(td, h.bundle.Roots)
}

func TestHugeValidityIsClampedNotWrapped(t *testing.T) {
	h := newHarness(t)
	resp, err := h.call(bearer(h.token(t, devtoken.MintRequest{})), &pb.IstioCertificateRequest{Csr: csr(t, p256(t), nil), ValidityDuration: 1<<63 - 1})
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.ParseCerts([]byte(resp.CertChain[0]))
	if err != nil {
		t.Fatal(err)
	}
	if got := leaf[0].NotAfter.Sub(h.clock.Now()); got != ca.DefaultTTLPolicy.Max {
		t.Fatalf("leaf lives %s, want the maximum %s", got, ca.DefaultTTLPolicy.Max)
	}
}

// failingFile is a segment file on a disk that can fill up.
type failingFile struct {
	*os.File
	full *atomic.Bool
}

func (f failingFile) Write(p []byte) (int, error) {
	if f.full.Load() {
		return 0, syscall.ENOSPC
	}
	return f.File.Write(p)
}

func TestLedgerFailureFailsClosed(t *testing.T) {
	var full atomic.Bool
	diskFull := func(h *harness) {
		h.records = startLedger(t, audit.Config{Dir: filepath.Join(t.TempDir(), "audit"), Clock: h.clock,
			OpenFile: func(name string, flag int, perm fs.FileMode) (audit.File, error) {
				f, err := os.OpenFile(name, flag, perm)
				if err != nil {
					return nil, err
				}
				return failingFile{f, &full}, nil
			}})
		h.ledger = h.records
	}
	readOnlyDir := filepath.Join(t.TempDir(), "ro")
	readOnly := func(h *harness) {
		// A segment per record: every issuance must create a file.
		h.records = startLedger(t, audit.Config{Dir: readOnlyDir, Clock: h.clock, SegmentBytes: 1})
		h.ledger = h.records
	}
	for _, tc := range []struct {
		name       string
		opt        option
		fail, heal func(t *testing.T)
	}{
		{"full disk", diskFull, func(*testing.T) { full.Store(true) }, func(*testing.T) { full.Store(false) }},
		{"read-only directory", readOnly, func(t *testing.T) { immutable(t, readOnlyDir, true) }, func(t *testing.T) { immutable(t, readOnlyDir, false) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, tc.opt)
			md := bearer(h.token(t, devtoken.MintRequest{}))
			if _, err := h.call(md, &pb.IstioCertificateRequest{Csr: csr(t, p256(t), nil)}); err != nil {
				t.Fatal(err)
			}
			tc.fail(t)
			_, err := h.call(md, &pb.IstioCertificateRequest{Csr: csr(t, p256(t), nil)})
			if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "audit ledger is unavailable, so no certificate was issued") {
				t.Fatalf("issuance with a broken ledger: %v, want Unavailable naming the ledger", err)
			}
			if got := requests(t, h, "denied", "ledger-unavailable"); got != 1 {
				t.Errorf("denied{reason=ledger-unavailable} = %v, want 1", got)
			}
			tc.heal(t)
			if _, err := h.call(md, &pb.IstioCertificateRequest{Csr: csr(t, p256(t), nil)}); err != nil {
				t.Fatalf("after the disk recovered: %v", err)
			}
			if n := len(h.recorded(t, audit.KindIssued)); n != 2 {
				t.Errorf("%d issuance records, want 2 (the refused one is not there)", n)
			}
			if rep, err := h.records.Verify(context.Background(), audit.VerifyOptions{}); err != nil || rep.Failure != nil {
				t.Fatalf("verify after the fault: %+v %v", rep.Failure, err)
			}
		})
	}
}

// immutable makes dir read-only even for root (chattr +i), or undoes it.
func immutable(t *testing.T, dir string, on bool) {
	t.Helper()
	flag := "-i"
	if on {
		flag = "+i"
		t.Cleanup(func() { exec.Command("chattr", "-i", dir).Run() })
	}
	if out, err := exec.Command("chattr", flag, dir).CombinedOutput(); err != nil {
		t.Fatalf("chattr %s %s (needs e2fsprogs and CAP_LINUX_IMMUTABLE): %v %s", flag, dir, err, out)
	}
}
