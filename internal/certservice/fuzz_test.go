package certservice_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"math"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/devtoken"
	"github.com/meshca/meshca/internal/certservice"
)

// fuzzNow is where both clocks stand still: tokens never expire and the
// CA never renews while the fuzzer runs. It has a sub-second part on
// purpose: certificates carry whole seconds, and a real clock almost
// never sits on a second boundary.
var fuzzNow = time.Date(2026, 3, 1, 12, 0, 0, 500_000_000, time.UTC)

// fuzzAllowedCodes are the only codes bad input may produce. Internal or
// Unknown for anything a caller can send is a bug.
var fuzzAllowedCodes = []codes.Code{codes.Unauthenticated, codes.InvalidArgument, codes.PermissionDenied, codes.Unavailable}

// fuzzEnv is a Service wired to a real CA and a real devtoken authority.
type fuzzEnv struct {
	svc    *certservice.Service
	tokens *devtoken.Authority
	token  string // a valid token for spiffe://cluster.local/ns/default/sa/fuzz
}

// FuzzCreateCertificate calls CreateCertificate with arbitrary CSRs,
// validities, authorization and cluster metadata, and request metadata
// keys. Seeds live in testdata/fuzz/FuzzCreateCertificate and below.
func FuzzCreateCertificate(f *testing.F) {
	env := fuzzNewEnv(f)
	for _, s := range fuzzServiceSeeds(f, "Bearer "+env.token) {
		f.Add(s.csr, s.validity, s.authorization, s.clusterID, s.metadataKey)
	}

	f.Fuzz(func(t *testing.T, csr string, validity int64, authorization, clusterID, metadataKey string) {
		ctx := context.Background()
		if authorization != "" || clusterID != "" {
			md := metadata.MD{"authorization": {authorization}}
			if clusterID != "" {
				md["clusterid"] = []string{clusterID}
			}
			ctx = metadata.NewIncomingContext(ctx, md)
		}
		req := &pb.IstioCertificateRequest{Csr: csr, ValidityDuration: validity}
		if metadataKey != "" {
			req.Metadata = &structpb.Struct{Fields: map[string]*structpb.Value{
				metadataKey: structpb.NewStringValue("spiffe://cluster.local/ns/kube-system/sa/admin"),
			}}
		}

		resp, err := env.svc.CreateCertificate(ctx, req)
		if err != nil {
			if resp != nil {
				t.Fatalf("CreateCertificate returned both a response and an error: %v", err)
			}
			fuzzCheckError(t, err, env.token, fuzzBearer(authorization), csr, clusterID)
			return
		}

		// Success: only for an authenticated, non-impersonating caller with
		// a non-negative validity and a CSR the CA accepts.
		if metadataKey == "ImpersonatedIdentity" {
			t.Fatal("impersonation request succeeded")
		}
		if validity < 0 {
			t.Fatalf("negative validity %d succeeded", validity)
		}
		caller, aerr := env.tokens.Authenticate(ctx, identity.Credential{Token: fuzzBearer(authorization), ClusterID: clusterID})
		if aerr != nil {
			t.Fatalf("certificate issued, but the presented credential does not authenticate: %v", aerr)
		}
		parsed, cerr := ca.ParseCSR([]byte(csr))
		if cerr != nil {
			t.Fatalf("certificate issued for a CSR ParseCSR refuses: %v", cerr)
		}
		fuzzCheckChain(t, resp.GetCertChain(), caller.ID, parsed.PublicKey, validity)
	})
}

// fuzzCheckError requires a gRPC status with an allowed code and a message
// that does not reveal the caller's token.
func fuzzCheckError(t *testing.T, err error, validToken, presented, csr, clusterID string) {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("error is not a gRPC status: %T %v", err, err)
	}
	if !slices.Contains(fuzzAllowedCodes, st.Code()) {
		t.Fatalf("CreateCertificate returned %s (%q); bad input may only yield %v", st.Code(), st.Message(), fuzzAllowedCodes)
	}
	if st.Message() == "" {
		t.Fatalf("%s status without a message", st.Code())
	}
	// The cluster ID and CSR details are echoed on purpose; a token is
	// leaked only if it appears without the caller having put it there.
	echoed := func(s string) bool { return strings.Contains(clusterID, s) || strings.Contains(csr, s) }
	if strings.Contains(st.Message(), validToken) && !echoed(validToken) {
		t.Fatalf("error message contains the token: %q", st.Message())
	}
	if fuzzTokenLike(presented) && strings.Contains(st.Message(), presented) && !echoed(presented) {
		t.Fatalf("error message contains the presented token %q: %q", presented, st.Message())
	}
}

// fuzzTokenLike reports a string long enough and JWT-shaped enough that it
// cannot appear in an error message by coincidence.
func fuzzTokenLike(s string) bool {
	if len(s) < 24 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// fuzzBearer extracts the token the way RFC 6750 reads "Bearer <token>".
func fuzzBearer(authorization string) string {
	scheme, token, ok := strings.Cut(strings.TrimSpace(authorization), " ")
	if !ok || !strings.EqualFold(scheme, "bearer") {
		return ""
	}
	return strings.TrimSpace(token)
}

// fuzzCheckChain verifies a successful response: leaf first, root last, at
// least one intermediate, the caller's identity and nothing else, the CSR's
// key, and the lifetime the request asked for, clamped to the policy.
func fuzzCheckChain(t *testing.T, chainPEM []string, id spiffeid.ID, pub crypto.PublicKey, validity int64) {
	t.Helper()
	if len(chainPEM) < 3 {
		t.Fatalf("chain has %d elements, want leaf, intermediate(s) and root", len(chainPEM))
	}
	certs := make([]*x509.Certificate, 0, len(chainPEM))
	for i, p := range chainPEM {
		block, rest := pem.Decode([]byte(p))
		if block == nil || block.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
			t.Fatalf("chain element %d is not exactly one PEM certificate: %q", i, p)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatalf("chain element %d: %v", i, err)
		}
		certs = append(certs, c)
	}
	leaf, root := certs[0], certs[len(certs)-1]

	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Fatalf("leaf URI SANs are %v, want exactly [%s]", leaf.URIs, id)
	}
	if n := len(leaf.DNSNames) + len(leaf.IPAddresses) + len(leaf.EmailAddresses); n != 0 {
		t.Fatalf("leaf carries %d DNS/IP/email SANs", n)
	}
	if leaf.IsCA {
		t.Fatal("leaf is a CA")
	}
	if k, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(pub) {
		t.Fatal("leaf does not certify the CSR's public key")
	}

	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	for _, c := range certs[1 : len(certs)-1] {
		inters.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inters, CurrentTime: fuzzNow,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		t.Fatalf("chain does not verify at issuance time: %v", err)
	}

	// validity_duration is in seconds; 0 means the default and anything
	// above the maximum is clamped to it. Certificates carry whole seconds.
	p := ca.DefaultTTLPolicy
	want := p.Default
	switch {
	case validity >= int64(p.Max/time.Second):
		want = p.Max
	case validity > 0:
		want = time.Duration(validity) * time.Second
	}
	if wantNotAfter := fuzzNow.Add(want).Truncate(time.Second); !leaf.NotAfter.Equal(wantNotAfter) {
		t.Fatalf("validity_duration %d: leaf lives until %s (%s from issuance), want %s (%s)",
			validity, leaf.NotAfter.UTC().Format(time.RFC3339Nano), leaf.NotAfter.Sub(fuzzNow), wantNotAfter.Format(time.RFC3339), want)
	}
}

// fuzzNewEnv builds the service once per fuzzing process. The devtoken key
// is derived from a fixed label so that tokens in the committed corpus,
// minted with the same key at fuzzNow, verify too. It is a test key and
// signs nothing but test tokens.
func fuzzNewEnv(tb testing.TB) *fuzzEnv {
	tb.Helper()
	quietLog := slog.New(slog.DiscardHandler)
	clock := clockwork.NewFakeClockAt(fuzzNow)
	dir := tb.TempDir()

	authority := catest.NewAuthority(tb, clock)

	keyFile := filepath.Join(dir, "devtoken.pem")
	if err := os.WriteFile(keyFile, fuzzDevtokenKeyPEM(tb), 0o600); err != nil {
		tb.Fatal(err)
	}
	tokens, err := devtoken.New(devtoken.Config{KeyFile: keyFile, TrustDomain: td, Clock: clock, Logger: quietLog})
	if err != nil {
		tb.Fatal(err)
	}
	token, err := tokens.Mint(devtoken.MintRequest{Namespace: "default", ServiceAccount: "fuzz"})
	if err != nil {
		tb.Fatal(err)
	}

	svc, err := certservice.New(certservice.Config{Authenticator: tokens, Issuer: authority, Logger: quietLog})
	if err != nil {
		tb.Fatal(err)
	}
	return &fuzzEnv{svc: svc, tokens: tokens, token: token}
}

func fuzzDevtokenKeyPEM(tb testing.TB) []byte {
	tb.Helper()
	d := sha256.Sum256([]byte("meshca certservice fuzz devtoken key"))
	key, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), d[:])
	if err != nil {
		tb.Fatal(err)
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
}

type fuzzSeed struct {
	csr                                   string
	validity                              int64
	authorization, clusterID, metadataKey string
}

// fuzzServiceSeeds mirror the committed corpus with freshly generated
// CSRs and the valid authorization header.
func fuzzServiceSeeds(tb testing.TB, auth string) []fuzzSeed {
	tb.Helper()
	newKey := func(gen func() (crypto.Signer, error)) crypto.Signer {
		k, err := gen()
		if err != nil {
			tb.Fatal(err)
		}
		return k
	}
	p256 := newKey(func() (crypto.Signer, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) })
	p384 := newKey(func() (crypto.Signer, error) { return ecdsa.GenerateKey(elliptic.P384(), rand.Reader) })
	rsa2048 := newKey(func() (crypto.Signer, error) { return rsa.GenerateKey(rand.Reader, 2048) })
	mkCSR := func(key crypto.Signer, tmpl *x509.CertificateRequest) string {
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			tb.Fatal(err)
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	}
	mkURL := func(s string) []*url.URL {
		u, err := url.Parse(s)
		if err != nil {
			tb.Fatal(err)
		}
		return []*url.URL{u}
	}

	valid := mkCSR(p256, &x509.CertificateRequest{})
	block, _ := pem.Decode([]byte(valid))
	truncated := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: block.Bytes[:40]}))
	huge := valid + strings.Repeat("A", ca.MaxCSRBytes)
	tampered := auth[:len(auth)-2] + "AA"

	return []fuzzSeed{
		{valid, 3600, auth, "", ""},
		{string(block.Bytes), 0, auth, "Kubernetes", ""},
		{mkCSR(p384, &x509.CertificateRequest{URIs: mkURL("spiffe://cluster.local/ns/default/sa/fuzz")}), 86400, auth, "", ""},
		{mkCSR(rsa2048, &x509.CertificateRequest{}), 600, "bearer " + strings.TrimPrefix(auth, "Bearer "), "", ""},
		{mkCSR(p256, &x509.CertificateRequest{URIs: mkURL("spiffe://cluster.local/ns/kube-system/sa/admin")}), 3600, auth, "", ""},
		{mkCSR(p256, &x509.CertificateRequest{DNSNames: []string{"web.default.svc"}}), 3600, auth, "", ""},
		{"garbage", 3600, auth, "", ""},
		{"", 3600, auth, "", ""},
		{truncated, 3600, auth, "", ""},
		{valid + "junk", 3600, auth, "", ""},
		{huge, 3600, auth, "", ""},
		{valid, -1, auth, "", ""},
		{valid, math.MaxInt64, auth, "", ""},
		{valid, 3600, auth, "", "ImpersonatedIdentity"},
		{valid, 3600, auth, "other-cluster", ""},
		{valid, 3600, tampered, "", ""},
		{valid, 3600, "Basic dXNlcjpwYXNz", "", ""},
		{valid, 3600, "Bearer ", "", ""},
		{valid, 3600, "", "", ""},
	}
}
