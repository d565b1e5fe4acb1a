package ca_test

import (
	"context"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/ca"
)

var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

func issue(t *testing.T, a *ca.Authority, id spiffeid.ID) *ca.Issued {
	t.Helper()
	key := newKey(t)
	got, err := a.Issue(context.Background(), ca.Request{CSR: csrPEM(t, key, nil), ID: id})
	if err != nil {
		t.Fatal(err)
	}
	if !key.PublicKey.Equal(got.Leaf().PublicKey) {
		t.Fatal("issued certificate does not carry the CSR's public key")
	}
	return got
}

func TestIssuedSVIDFields(t *testing.T) {
	e := newEnv(t)
	got := issue(t, e.auth, workload)
	leaf := got.Leaf()

	id, chains, err := x509svid.Verify(got.Chain, e.auth.Bundle(), x509svid.WithTime(start))
	if err != nil {
		t.Fatalf("go-spiffe rejects the issued SVID: %v", err)
	}
	if id != workload {
		t.Errorf("SPIFFE ID = %s, want %s", id, workload)
	}
	if len(chains) != 1 || len(chains[0]) != 3 {
		t.Errorf("verified chain = %d chains, want one leaf→intermediate→root", len(chains))
	}
	if len(got.Chain) != 2 || !got.Chain[1].IsCA || got.Chain[1].MaxPathLen != 0 || !got.Chain[1].MaxPathLenZero {
		t.Errorf("chain should be leaf + intermediate (pathlen 0)")
	}
	if !got.Root.Equal(got.Roots[0]) {
		t.Error("Root is not the anchor of the bundle")
	}
	if len(got.Roots) != 1 || !got.Roots[0].IsCA || got.Roots[0].CheckSignatureFrom(got.Roots[0]) != nil {
		t.Errorf("roots should be one self-signed CA")
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != workload.String() ||
		len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Errorf("SANs: URIs=%v DNS=%v IPs=%v, want only %s", leaf.URIs, leaf.DNSNames, leaf.IPAddresses, workload)
	}
	if leaf.IsCA || !leaf.BasicConstraintsValid {
		t.Error("leaf must carry basic constraints CA:FALSE")
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("KeyUsage = %b, want digitalSignature", leaf.KeyUsage)
	}
	if len(leaf.ExtKeyUsage) != 2 {
		t.Errorf("ExtKeyUsage = %v, want serverAuth+clientAuth", leaf.ExtKeyUsage)
	}
	if leaf.SerialNumber.Sign() <= 0 || leaf.SerialNumber.BitLen() > 128 || leaf.SerialNumber.BitLen() < 64 {
		t.Errorf("serial %x has %d bits, want a random positive ≤128-bit value", leaf.SerialNumber, leaf.SerialNumber.BitLen())
	}
	if !leaf.NotBefore.Equal(start.Add(-ca.Backdate)) || !leaf.NotAfter.Equal(start.Add(time.Hour)) {
		t.Errorf("validity %v..%v, want %v..%v", leaf.NotBefore, leaf.NotAfter, start.Add(-ca.Backdate), start.Add(time.Hour))
	}
	if len(leaf.Subject.Names) != 0 {
		t.Errorf("subject = %q, want empty", leaf.Subject)
	}
	var sanCritical bool
	for _, ext := range leaf.Extensions {
		if ext.Id.Equal(oidSAN) {
			sanCritical = ext.Critical
		}
	}
	if !sanCritical {
		t.Error("SAN extension must be critical when the subject is empty")
	}
	if got.Clamped {
		t.Error("a default request was reported clamped")
	}
}

func TestIssuedChainVerifiesWithOpenSSL(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		t.Fatal("openssl is required for this test (the CI script installs it): ", err)
	}
	e := newEnv(t)
	got := issue(t, e.auth, workload)
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	root := write("root.pem", ca.EncodeCerts(got.Roots...))
	inter := write("inter.pem", ca.EncodeCerts(got.Chain[1:]...))
	leaf := write("leaf.pem", ca.EncodeCerts(got.Leaf()))
	at := strconv.FormatInt(start.Add(time.Minute).Unix(), 10)

	out, err := exec.Command(openssl, "verify", "-attime", at, "-purpose", "sslclient",
		"-CAfile", root, "-untrusted", inter, leaf).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "OK") {
		t.Fatalf("openssl verify failed: %v\n%s", err, out)
	}
	out, err = exec.Command(openssl, "verify", "-attime", at, "-purpose", "sslserver",
		"-CAfile", root, "-untrusted", inter, leaf).CombinedOutput()
	if err != nil {
		t.Fatalf("openssl verify (server) failed: %v\n%s", err, out)
	}
	// And it can fail: past the leaf's expiry openssl must refuse it.
	late := strconv.FormatInt(start.Add(2*time.Hour).Unix(), 10)
	out, err = exec.Command(openssl, "verify", "-attime", late, "-CAfile", root, "-untrusted", inter, leaf).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "expired") {
		t.Fatalf("openssl accepted an expired leaf: %s", out)
	}
}

func TestIssueRejectsCSRAndForeignTrustDomain(t *testing.T) {
	e := newEnv(t)
	other := spiffeid.RequireFromString("spiffe://cluster.local/ns/kube-system/sa/admin")
	_, err := e.auth.Issue(context.Background(), ca.Request{
		CSR: csrPEM(t, newKey(t), &x509.CertificateRequest{URIs: uris(t, other.String())}), ID: workload})
	var ce *ca.CSRError
	if !errors.As(err, &ce) || ce.Problem != ca.CSRIdentity {
		t.Fatalf("err = %v, want identity mismatch", err)
	}
	foreign := spiffeid.RequireFromString("spiffe://evil.example/ns/default/sa/web")
	_, err = e.auth.Issue(context.Background(), ca.Request{CSR: csrPEM(t, newKey(t), nil), ID: foreign})
	if !errors.Is(err, ca.ErrForeignTrustDomain) {
		t.Fatalf("err = %v, want ErrForeignTrustDomain", err)
	}
}

func TestRequestedTTLIsClamped(t *testing.T) {
	e := newEnv(t)
	got, err := e.auth.Issue(context.Background(), ca.Request{CSR: csrPEM(t, newKey(t), nil), ID: workload, TTL: 30 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !got.Clamped || !got.Leaf().NotAfter.Equal(start.Add(24*time.Hour)) {
		t.Errorf("NotAfter = %v clamped=%v, want %v clamped", got.Leaf().NotAfter, got.Clamped, start.Add(24*time.Hour))
	}
}

func TestRestartKeepsTheSameCA(t *testing.T) {
	e := newEnv(t)
	before := e.auth.Issuer()
	again := newSelfManaged(t, e.keys, e.journal, e.clock)
	after := again.Issuer()
	if !after.Roots[0].Equal(before.Roots[0]) || !after.Cert.Equal(before.Cert) {
		t.Fatal("restart created a new CA instead of loading the journal")
	}
	// A leaf from the first instance verifies against the second's bundle.
	got := issue(t, e.auth, workload)
	if _, _, err := x509svid.Verify(got.Chain, again.Bundle(), x509svid.WithTime(start)); err != nil {
		t.Fatal(err)
	}
}

func TestIntermediateRenewedAtHalfLife(t *testing.T) {
	e := newEnv(t)
	old := e.auth.Issuer()
	oldLeaf := issue(t, e.auth, workload)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- e.auth.Run(ctx) }()
	if err := e.clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}

	// Just before half-life nothing changes.
	changed := e.auth.Changed()
	if err := e.auth.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	if !e.auth.Issuer().Cert.Equal(old.Cert) {
		t.Fatal("intermediate renewed before half-life")
	}
	e.clock.Advance(24*time.Hour + time.Second)
	select {
	case <-changed:
	case <-ctx.Done():
	case err := <-done:
		t.Fatalf("Run returned early: %v", err)
	}
	now := e.auth.Issuer()
	if now.Cert.Equal(old.Cert) {
		t.Fatal("intermediate not renewed after half-life")
	}
	if !now.Roots[0].Equal(old.Roots[0]) {
		t.Fatal("renewal must keep the root")
	}
	if _, _, err := x509svid.Verify(oldLeaf.Chain, e.auth.Bundle(), x509svid.WithTime(start.Add(time.Minute))); err != nil {
		t.Errorf("a leaf of the old intermediate no longer verifies: %v", err)
	}
	// The journal names the new intermediate, so a restart resumes with it.
	j, err := ca.LoadJournal(e.journal)
	if err != nil {
		t.Fatal(err)
	}
	recorded, err := ca.ParseCerts([]byte(j.Current.IntermediateCertPEM))
	if err != nil || !recorded[0].Equal(now.Cert) {
		t.Errorf("journal does not record the renewed intermediate (err=%v)", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestFailedRenewalKeepsSigning(t *testing.T) {
	e := newEnv(t)
	old := e.auth.Issuer()
	// Make the journal unwritable: its directory becomes a file.
	dir := filepath.Dir(e.journal)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(25 * time.Hour)
	if err := e.auth.Maintain(context.Background()); err == nil {
		t.Fatal("renewal with an unwritable journal succeeded")
	}
	if !e.auth.Issuer().Cert.Equal(old.Cert) {
		t.Fatal("a failed renewal replaced the issuer")
	}
	issue(t, e.auth, workload)
}

func TestRefusesIssuerThatCannotCoverLeaves(t *testing.T) {
	src, err := ca.NewSelfManaged(ca.SelfManagedConfig{TrustDomain: td, Keys: newEnv(t).keys,
		JournalPath: filepath.Join(t.TempDir(), "j.json"), IntermediateTTL: 4 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.New(ca.Config{TrustDomain: td, Source: src, Clock: newEnv(t).clock})
	if err != nil {
		t.Fatal(err)
	}
	// A 4h intermediate is renewed at 2h, which covers fewer than 3 leaves.
	err = a.Init(context.Background())
	if err != nil {
		t.Fatalf("a fresh 4h intermediate covers 3×1h: %v", err)
	}
	a2, _ := ca.New(ca.Config{TrustDomain: td, Source: src, Clock: newEnv(t).clock,
		TTL: ca.TTLPolicy{Default: 2 * time.Hour, Max: 2 * time.Hour, Coverage: 3}})
	err = a2.Init(context.Background())
	var ce *ca.CoverageError
	if !errors.As(err, &ce) {
		t.Fatalf("err = %v, want *CoverageError", err)
	}
}

func TestCorruptJournalFailsClearly(t *testing.T) {
	e := newEnv(t)
	if err := os.WriteFile(e.journal, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	src, _ := ca.NewSelfManaged(ca.SelfManagedConfig{TrustDomain: td, Keys: e.keys, JournalPath: e.journal})
	a, _ := ca.New(ca.Config{TrustDomain: td, Source: src, Clock: e.clock})
	err := a.Init(context.Background())
	if err == nil || !strings.Contains(err.Error(), "is corrupt") {
		t.Fatalf("err = %v, want a corrupt-journal error", err)
	}
}

func TestNotReadyBeforeInit(t *testing.T) {
	src, _ := ca.NewSelfManaged(ca.SelfManagedConfig{TrustDomain: td, Keys: newEnv(t).keys, JournalPath: filepath.Join(t.TempDir(), "j")})
	a, _ := ca.New(ca.Config{TrustDomain: td, Source: src})
	if _, err := a.SignKey(context.Background(), newKey(t).Public(), workload, 0); !errors.Is(err, ca.ErrNotReady) {
		t.Fatalf("err = %v, want ErrNotReady", err)
	}
}
