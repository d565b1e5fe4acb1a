package ca_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"net/url"
	"path/filepath"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/keystore/memory"
)

var (
	td       = spiffeid.RequireTrustDomainFromString("cluster.local")
	workload = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/web")
	// start is a fixed instant so tests never depend on the wall clock.
	start = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
)

type env struct {
	clock   *clockwork.FakeClock
	keys    *memory.Store
	journal string
	auth    *ca.Authority
}

func newSelfManaged(t *testing.T, keys *memory.Store, journal string, clock clockwork.Clock) *ca.Authority {
	t.Helper()
	src, err := ca.NewSelfManaged(ca.SelfManagedConfig{TrustDomain: td, Keys: keys, JournalPath: journal})
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.New(ca.Config{TrustDomain: td, Source: src, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	return a
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{
		clock:   clockwork.NewFakeClockAt(start),
		keys:    memory.New(),
		journal: filepath.Join(t.TempDir(), "ca-journal.json"),
	}
	e.auth = newSelfManaged(t, e.keys, e.journal, e.clock)
	return e
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// csrPEM builds a CSR for key with the given URI SANs.
func csrPEM(t testing.TB, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	if tmpl == nil {
		tmpl = &x509.CertificateRequest{}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func uris(t testing.TB, ss ...string) []*url.URL {
	t.Helper()
	var out []*url.URL
	for _, s := range ss {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, u)
	}
	return out
}
