// Package catest builds real certificate authorities for tests: a
// self-managed CA for cluster.local with its keys in memory, initialised and
// ready to sign.
package catest

import (
	"context"
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
