package ca_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"slices"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
)

// fuzzNow has a sub-second part on purpose: certificates carry whole
// seconds, and a real clock almost never sits on a second boundary.
var fuzzNow = time.Date(2026, 3, 1, 12, 0, 0, 500_000_000, time.UTC)

// Problems each stage may report; anything else is a bug.
var (
	fuzzParseProblems = []ca.CSRProblem{ca.CSRTooLarge, ca.CSRMalformed, ca.CSRBadSignature}
	fuzzCheckProblems = []ca.CSRProblem{ca.CSRKeyType, ca.CSRIdentity, ca.CSRUnsupportedSANs}
)

// FuzzParseCSR feeds arbitrary bytes to ParseCSR and CheckCSR and, for
// whatever they accept, issues a real certificate. Seeds live in
// testdata/fuzz/FuzzParseCSR and below.
func FuzzParseCSR(f *testing.F) {
	for _, seed := range fuzzCSRSeeds(f) {
		f.Add(seed)
	}
	auth := fuzzAuthority(f)

	f.Fuzz(func(t *testing.T, data []byte) {
		csr, err := ca.ParseCSR(data)
		if err != nil {
			fuzzRequireCSRError(t, "ParseCSR", err, fuzzParseProblems)
			return
		}
		if csr == nil {
			t.Fatal("ParseCSR returned neither a CSR nor an error")
		}
		// Whatever ParseCSR accepts is a correctly self-signed request.
		if err := csr.CheckSignature(); err != nil {
			t.Fatalf("ParseCSR accepted a CSR whose signature does not verify: %v", err)
		}
		// PEM and DER are two spellings of the same request.
		if block, _ := pem.Decode(data); block != nil {
			if !bytes.Equal(block.Bytes, csr.Raw) {
				t.Fatal("accepted CSR's Raw is not the PEM block's DER")
			}
			if _, err := ca.ParseCSR(csr.Raw); err != nil {
				t.Fatalf("PEM CSR accepted but its DER is refused: %v", err)
			}
		}

		if err := ca.CheckCSR(csr, workload); err != nil {
			fuzzRequireCSRError(t, "CheckCSR", err, fuzzCheckProblems)
			// Issue must refuse the same input with the same problem.
			_, ierr := auth.Issue(context.Background(), ca.Request{CSR: data, ID: workload})
			var want, got *ca.CSRError
			errors.As(err, &want)
			if !errors.As(ierr, &got) || got.Problem != want.Problem {
				t.Fatalf("CheckCSR refused with %v but Issue returned %v", err, ierr)
			}
			return
		}

		// Accepted: an allowed key, and no identity but the caller's.
		if err := ca.CheckPublicKey(csr.PublicKey); err != nil {
			t.Fatalf("CheckCSR accepted a key CheckPublicKey refuses: %v", err)
		}
		if n := len(csr.DNSNames) + len(csr.IPAddresses) + len(csr.EmailAddresses); n != 0 {
			t.Fatalf("CheckCSR accepted %d DNS/IP/email SANs: %v %v %v", n, csr.DNSNames, csr.IPAddresses, csr.EmailAddresses)
		}
		switch len(csr.URIs) {
		case 0:
		case 1:
			if csr.URIs[0].String() != workload.String() {
				t.Fatalf("CheckCSR accepted URI SAN %q for caller %s", csr.URIs[0], workload)
			}
		default:
			t.Fatalf("CheckCSR accepted %d URI SANs", len(csr.URIs))
		}

		// And a real authority signs it, with the caller's identity only.
		issued, err := auth.Issue(context.Background(), ca.Request{CSR: data, ID: workload})
		if err != nil {
			t.Fatalf("CSR passed ParseCSR and CheckCSR but Issue failed: %v", err)
		}
		leaf := issued.Leaf()
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != workload.String() {
			t.Fatalf("leaf URI SANs are %v, want exactly [%s]", leaf.URIs, workload)
		}
		if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
			t.Fatalf("leaf carries extra SANs: %v %v %v", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
		}
		if leaf.IsCA {
			t.Fatal("leaf is a CA")
		}
		if !fuzzKeysEqual(leaf.PublicKey, csr.PublicKey) {
			t.Fatal("leaf does not certify the CSR's public key")
		}
	})
}

// fuzzRequireCSRError fails unless err is a *ca.CSRError with a detail and
// one of the problems stage may report.
func fuzzRequireCSRError(t *testing.T, stage string, err error, allowed []ca.CSRProblem) {
	t.Helper()
	var ce *ca.CSRError
	if !errors.As(err, &ce) {
		t.Fatalf("%s returned %T (%v), want *ca.CSRError", stage, err, err)
	}
	if !slices.Contains(allowed, ce.Problem) {
		t.Fatalf("%s returned problem %q, want one of %q", stage, ce.Problem, allowed)
	}
	if ce.Detail == "" {
		t.Fatalf("%s returned problem %q without detail", stage, ce.Problem)
	}
}

func fuzzKeysEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// fuzzAuthority is a self-managed CA on an in-memory keystore whose clock
// stands still, so it never needs renewing while the fuzzer runs.
func fuzzAuthority(tb testing.TB) *ca.Authority {
	return catest.NewAuthority(tb, clockwork.NewFakeClockAt(fuzzNow))
}

// fuzzCSRSeeds are fresh examples of what the committed corpus holds:
// requests to accept and requests to refuse for each reason.
func fuzzCSRSeeds(tb testing.TB) [][]byte {
	tb.Helper()
	p256 := fuzzGenerate(tb, func() (crypto.Signer, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) })
	p384 := fuzzGenerate(tb, func() (crypto.Signer, error) { return ecdsa.GenerateKey(elliptic.P384(), rand.Reader) })
	p224 := fuzzGenerate(tb, func() (crypto.Signer, error) { return ecdsa.GenerateKey(elliptic.P224(), rand.Reader) })
	rsa2048 := fuzzGenerate(tb, func() (crypto.Signer, error) { return rsa.GenerateKey(rand.Reader, 2048) })

	own, err := url.Parse(workload.String())
	if err != nil {
		tb.Fatal(err)
	}
	foreign, err := url.Parse("spiffe://cluster.local/ns/kube-system/sa/admin")
	if err != nil {
		tb.Fatal(err)
	}
	valid := fuzzCSR(tb, p256, nil)
	validDER := fuzzDER(tb, valid)
	tampered := bytes.Clone(validDER)
	tampered[len(tampered)-3] ^= 0xff // inside the signature
	big := make([]byte, ca.MaxCSRBytes+1)
	copy(big, valid)

	return [][]byte{
		valid,
		validDER,
		fuzzCSR(tb, p384, &x509.CertificateRequest{URIs: []*url.URL{own}}),
		fuzzCSR(tb, rsa2048, nil),
		fuzzCSR(tb, p256, &x509.CertificateRequest{URIs: []*url.URL{foreign}}),
		fuzzCSR(tb, p256, &x509.CertificateRequest{URIs: []*url.URL{own, own}}),
		fuzzCSR(tb, p256, &x509.CertificateRequest{DNSNames: []string{"web.default.svc"}}),
		fuzzCSR(tb, p256, &x509.CertificateRequest{IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}}),
		fuzzCSR(tb, p256, &x509.CertificateRequest{EmailAddresses: []string{"web@example.com"}}),
		fuzzCSR(tb, p224, nil),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: tampered}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: validDER[:40]}),
		validDER[:len(validDER)/2],
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: validDER}),
		append(bytes.Clone(valid), "junk"...),
		append(bytes.Clone(valid), valid...),
		[]byte("garbage"),
		{0x30},
		{},
		big,
	}
}

func fuzzGenerate(tb testing.TB, gen func() (crypto.Signer, error)) crypto.Signer {
	tb.Helper()
	k, err := gen()
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

func fuzzCSR(tb testing.TB, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	tb.Helper()
	if tmpl == nil {
		tmpl = &x509.CertificateRequest{}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		tb.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func fuzzDER(tb testing.TB, pemData []byte) []byte {
	tb.Helper()
	block, _ := pem.Decode(pemData)
	if block == nil {
		tb.Fatal("no PEM block")
	}
	return block.Bytes
}
