package ca_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
)

func TestParseAndCheckCSR(t *testing.T) {
	p256 := newKey(t)
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	p521, _ := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	rsa1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	valid := csrPEM(t, p256, nil)
	tampered := func() []byte {
		block, _ := pem.Decode(valid)
		der := append([]byte(nil), block.Bytes...)
		der[len(der)-3] ^= 0xff // inside the signature
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	}()

	tests := []struct {
		name    string
		csr     []byte
		problem ca.CSRProblem // "" means accepted
		msg     string
	}{
		{name: "no SANs", csr: valid},
		{name: "own SPIFFE ID", csr: csrPEM(t, p256, &x509.CertificateRequest{URIs: uris(t, workload.String())})},
		{name: "DER instead of PEM", csr: mustDER(t, valid)},
		{name: "too large", csr: make([]byte, ca.MaxCSRBytes+1), problem: ca.CSRTooLarge, msg: "limit is 16384"},
		{name: "empty", csr: nil, problem: ca.CSRMalformed, msg: "no PEM"},
		{name: "garbage", csr: []byte("hello"), problem: ca.CSRMalformed, msg: "no PEM"},
		{name: "wrong PEM type", csr: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}}), problem: ca.CSRMalformed, msg: `"CERTIFICATE"`},
		{name: "trailing data", csr: append(append([]byte{}, valid...), "junk"...), problem: ca.CSRMalformed, msg: "after the CSR"},
		{name: "truncated DER", csr: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: mustDER(t, valid)[:40]}), problem: ca.CSRMalformed, msg: "cannot parse"},
		{name: "bad self-signature", csr: tampered, problem: ca.CSRBadSignature, msg: "does not verify"},
		{name: "P-224 key", csr: csrPEM(t, p224, nil), problem: ca.CSRKeyType, msg: "P-224 not allowed"},
		{name: "P-521 key", csr: csrPEM(t, p521, nil), problem: ca.CSRKeyType, msg: "P-521 not allowed"},
		{name: "Ed25519 key", csr: csrPEM(t, ed, nil), problem: ca.CSRKeyType, msg: "ed25519.PublicKey not allowed"},
		{name: "RSA-1024 key", csr: csrPEM(t, rsa1024, nil), problem: ca.CSRKeyType, msg: "1024 bits not allowed"},
		{name: "other SPIFFE ID", csr: csrPEM(t, p256, &x509.CertificateRequest{URIs: uris(t, "spiffe://cluster.local/ns/kube-system/sa/admin")}),
			problem: ca.CSRIdentity, msg: `asks for "spiffe://cluster.local/ns/kube-system/sa/admin" but the caller is authenticated as "spiffe://cluster.local/ns/default/sa/web"`},
		{name: "other trust domain", csr: csrPEM(t, p256, &x509.CertificateRequest{URIs: uris(t, "spiffe://evil.example/ns/default/sa/web")}),
			problem: ca.CSRIdentity, msg: "spiffe://evil.example/ns/default/sa/web"},
		{name: "own path in an alias trust domain", csr: csrPEM(t, p256, &x509.CertificateRequest{URIs: uris(t, "spiffe://old.example/ns/default/sa/web")})},
		{name: "other path in an alias trust domain", csr: csrPEM(t, p256, &x509.CertificateRequest{URIs: uris(t, "spiffe://old.example/ns/default/sa/db")}),
			problem: ca.CSRIdentity, msg: "spiffe://old.example/ns/default/sa/db"},
		{name: "two URIs", csr: csrPEM(t, p256, &x509.CertificateRequest{URIs: uris(t, workload.String(), "spiffe://cluster.local/ns/x/sa/y")}),
			problem: ca.CSRIdentity, msg: "2 URI SANs"},
		{name: "DNS SAN", csr: csrPEM(t, p256, &x509.CertificateRequest{DNSNames: []string{"web.default.svc"}}), problem: ca.CSRUnsupportedSANs, msg: "1 DNS/IP/email"},
		{name: "IP SAN", csr: csrPEM(t, p256, &x509.CertificateRequest{IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}}), problem: ca.CSRUnsupportedSANs, msg: "DNS/IP/email"},
		{name: "email SAN", csr: csrPEM(t, p256, &x509.CertificateRequest{EmailAddresses: []string{"a@b.c"}}), problem: ca.CSRUnsupportedSANs, msg: "DNS/IP/email"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			csr, err := ca.ParseCSR(tc.csr)
			if err == nil {
				err = ca.CheckCSR(csr, workload, spiffeid.RequireTrustDomainFromString("old.example"))
			}
			if tc.problem == "" {
				if err != nil {
					t.Fatalf("rejected a valid CSR: %v", err)
				}
				return
			}
			var ce *ca.CSRError
			if !errors.As(err, &ce) {
				t.Fatalf("err = %v, want *ca.CSRError %s", err, tc.problem)
			}
			if ce.Problem != tc.problem || !strings.Contains(ce.Error(), tc.msg) {
				t.Fatalf("got %s %q, want %s containing %q", ce.Problem, ce.Error(), tc.problem, tc.msg)
			}
		})
	}
}

func TestCheckPublicKeyAcceptsAllowedKeys(t *testing.T) {
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rsa2048, _ := rsa.GenerateKey(rand.Reader, 2048)
	for _, k := range []crypto.Signer{newKey(t), p384, rsa2048} {
		if err := ca.CheckPublicKey(k.Public()); err != nil {
			t.Errorf("%T rejected: %v", k, err)
		}
	}
}

func mustDER(t *testing.T, p []byte) []byte {
	t.Helper()
	b, _ := pem.Decode(p)
	if b == nil {
		t.Fatal("no PEM")
	}
	return b.Bytes
}
