// Package catest builds real certificate authorities for tests: a
// self-managed CA for cluster.local with its keys in memory, initialised and
// ready to sign.
package catest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"path/filepath"
	"testing"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/keystore/memory"
)

// TrustDomain is the trust domain of the authorities catest builds.
var TrustDomain = spiffeid.RequireTrustDomainFromString("cluster.local")

// NewAuthority returns an initialised authority whose journal lives in
// tb.TempDir(). A nil clock is the real one.
func NewAuthority(tb testing.TB, clock clockwork.Clock) *ca.Authority {
	tb.Helper()
	src, err := ca.NewSelfManaged(ca.SelfManagedConfig{
		TrustDomain: TrustDomain,
		Keys:        memory.New(),
		JournalPath: filepath.Join(tb.TempDir(), "ca-journal.json"),
	})
	if err != nil {
		tb.Fatal(err)
	}
	a, err := ca.New(ca.Config{TrustDomain: TrustDomain, Source: src, Clock: clock})
	if err != nil {
		tb.Fatal(err)
	}
	if err := a.Init(context.Background()); err != nil {
		tb.Fatal(err)
	}
	return a
}

// NewRoot returns a self-signed root of TrustDomain, valid over v, that no
// authority holds the key of: to proxies, the second root of a rotation.
func NewRoot(tb testing.TB, v ca.Validity) *x509.Certificate {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	serial, err := ca.NewSerial(rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl, err := ca.RootTemplate(TrustDomain, key.Public(), serial, v)
	if err != nil {
		tb.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}
