package ca_test

// Benchmarks of the signing path, from the bare x509.CreateCertificate call
// up to (*ca.Authority).Issue. The gRPC round trip is benchmarked in
// internal/loadgen.

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/benchtest"
)

// benchFixture is a self-managed P-256 CA on an in-memory keystore, on the
// real clock, plus a workload key and its CSR. Setting it up costs three key
// generations and two signatures, well under a millisecond.
type benchFixture struct {
	auth   *ca.Authority
	issuer *ca.Issuer
	key    *ecdsa.PrivateKey
	csrPEM []byte
}

func newBenchFixture(b *testing.B) *benchFixture {
	b.Helper()
	a := catest.NewAuthority(b, nil)
	key := newKey(b)
	// An empty request, as caclient and Istio's agent send: the identity
	// comes from the token.
	return &benchFixture{auth: a, issuer: a.Issuer(), key: key, csrPEM: csrPEM(b, key, nil)}
}

// leafTemplate is the SVID template the authority would build, with a fixed
// serial and validity.
func (f *benchFixture) leafTemplate(b *testing.B) *x509.Certificate {
	b.Helper()
	serial, err := ca.NewSerial(rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now()
	tmpl, err := ca.LeafTemplate(workload, f.key.Public(), serial,
		ca.Validity{NotBefore: now.Add(-ca.Backdate), NotAfter: now.Add(time.Hour)})
	if err != nil {
		b.Fatal(err)
	}
	return tmpl
}

// BenchmarkCreateCertificateP256 is the baseline: the bare library call that
// signs a P-256 SVID with the P-256 intermediate key, and nothing else. Every
// other figure is compared with it.
func BenchmarkCreateCertificateP256(b *testing.B) {
	f := newBenchFixture(b)
	tmpl := f.leafTemplate(b)
	benchtest.SequentialAndParallel(b, func(b *testing.B) {
		if _, err := x509.CreateCertificate(rand.Reader, tmpl, f.issuer.Cert, f.key.Public(), f.issuer.Signer); err != nil {
			b.Error(err)
		}
	})
}

// BenchmarkSignKey is the authority's signing path for a vetted key: serial,
// template, signature, parse, and re-verification of the issued chain.
func BenchmarkSignKey(b *testing.B) {
	f := newBenchFixture(b)
	ctx := context.Background()
	benchtest.SequentialAndParallel(b, func(b *testing.B) {
		if _, err := f.auth.SignKey(ctx, f.key.Public(), workload, 0); err != nil {
			b.Error(err)
		}
	})
}

// BenchmarkIssue is what the server does per request once the caller is
// authenticated: parse and verify the CSR, then SignKey.
func BenchmarkIssue(b *testing.B) {
	f := newBenchFixture(b)
	ctx := context.Background()
	req := ca.Request{CSR: f.csrPEM, ID: workload}
	benchtest.SequentialAndParallel(b, func(b *testing.B) {
		if _, err := f.auth.Issue(ctx, req); err != nil {
			b.Error(err)
		}
	})
}

// BenchmarkIssueSteps times the steps of Issue one by one, so the sum can be
// compared with BenchmarkIssue and the expensive steps are plain to see.
func BenchmarkIssueSteps(b *testing.B) {
	f := newBenchFixture(b)
	tmpl := f.leafTemplate(b)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, f.issuer.Cert, f.key.Public(), f.issuer.Signer)
	if err != nil {
		b.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		b.Fatal(err)
	}
	bundle := f.auth.Bundle()
	chain := append([]*x509.Certificate{leaf}, f.issuer.Chain...)
	now := time.Now()

	// The primitives, for reading the rest in units of ECDSA operations.
	digest := sha256.Sum256([]byte("meshca"))
	sig, err := ecdsa.SignASN1(rand.Reader, f.key, digest[:])
	if err != nil {
		b.Fatal(err)
	}
	b.Run("ECDSASignP256", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := ecdsa.SignASN1(rand.Reader, f.key, digest[:]); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("ECDSAVerifyP256", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if !ecdsa.VerifyASN1(&f.key.PublicKey, digest[:], sig) {
				b.Fatal("signature does not verify")
			}
		}
	})

	b.Run("ParseCSR", func(b *testing.B) { // includes the CSR self-signature check
		b.ReportAllocs()
		for b.Loop() {
			if _, err := ca.ParseCSR(f.csrPEM); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("NewSerial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := ca.NewSerial(rand.Reader); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("CreateCertificate", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := x509.CreateCertificate(rand.Reader, tmpl, f.issuer.Cert, f.key.Public(), f.issuer.Signer); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("ParseCertificate", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := x509.ParseCertificate(der); err != nil {
				b.Fatal(err)
			}
		}
	})
	// What sign does today: leaf and intermediate up to the root, two
	// signature checks.
	b.Run("VerifyChain/leaf+intermediate", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, _, err := x509svid.Verify(chain, bundle, x509svid.WithTime(now)); err != nil {
				b.Fatal(err)
			}
		}
	})
	// The same SPIFFE checks with the intermediate as the anchor, one
	// signature check. The intermediate itself is verified against the
	// roots once, when the authority installs it (Issuer.Verify), so this is
	// what a per-issuer cache of that result would cost per issuance.
	interBundle := x509bundle.FromX509Authorities(workload.TrustDomain(), f.issuer.Chain[:1])
	b.Run("VerifyChain/leaf-only", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, _, err := x509svid.Verify(chain[:1], interBundle, x509svid.WithTime(now)); err != nil {
				b.Fatal(err)
			}
		}
	})
	// certservice PEM-encodes the intermediate and the root for every
	// response although they change only with the issuer.
	b.Run("EncodeIssuerPEM", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = ca.EncodeCerts(f.issuer.Chain...)
			_ = ca.EncodeCerts(f.issuer.Roots[0])
		}
	})
}
