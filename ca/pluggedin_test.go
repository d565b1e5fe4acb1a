package ca_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/ca"
)

// writeCACerts writes an Istio-style cacerts directory for a fresh root and
// intermediate valid until notAfter, and returns the root.
func writeCACerts(t *testing.T, dir string, notAfter time.Time) *x509.Certificate {
	t.Helper()
	rootKey, interKey := newKey(t), newKey(t)
	v := ca.Validity{NotBefore: start.Add(-time.Hour), NotAfter: notAfter}
	rootT, _ := ca.RootTemplate(td, rootKey.Public(), big.NewInt(time.Now().UnixNano()), v)
	rootDER, err := x509.CreateCertificate(randReader{}, rootT, rootT, rootKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	interT, _ := ca.IntermediateTemplate(td, interKey.Public(), big.NewInt(time.Now().UnixNano()+1), v)
	interDER, err := x509.CreateCertificate(randReader{}, interT, root, interKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	inter, _ := x509.ParseCertificate(interDER)
	keyDER, _ := x509.MarshalPKCS8PrivateKey(interKey)
	files := map[string][]byte{
		ca.CACertFile:    ca.EncodeCerts(inter),
		ca.CAKeyFile:     pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		ca.CertChainFile: ca.EncodeCerts(inter, root), // as Istio's samples lay it out
		ca.RootCertFile:  ca.EncodeCerts(root),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func newPluggedIn(t *testing.T, dir string, clock clockwork.Clock) *ca.Authority {
	t.Helper()
	src, err := ca.NewPluggedIn(ca.PluggedInConfig{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.New(ca.Config{TrustDomain: td, Source: src, Clock: clock, MaintainInterval: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestPluggedInCAIssuesAndHotReloads(t *testing.T) {
	dir := t.TempDir()
	clock := clockwork.NewFakeClockAt(start)
	root1 := writeCACerts(t, dir, start.Add(30*24*time.Hour))
	a := newPluggedIn(t, dir, clock)
	if err := a.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	got := issue(t, a, workload)
	if len(got.Chain) != 2 || len(got.Roots) != 1 || !got.Roots[0].Equal(root1) {
		t.Fatalf("chain %d certs, roots %d: want leaf+ca-cert with the plugged-in root (root not repeated)", len(got.Chain), len(got.Roots))
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	if err := clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}

	changed := a.Changed()
	root2 := writeCACerts(t, dir, start.Add(60*24*time.Hour))
	clock.Advance(5 * time.Second)
	<-changed
	got = issue(t, a, workload)
	if !got.Roots[0].Equal(root2) {
		t.Fatal("after the files changed, leaves still chain to the old root")
	}
	if _, _, err := x509svid.Verify(got.Chain, a.Bundle(), x509svid.WithTime(start)); err != nil {
		t.Fatal(err)
	}
	cancel()
	<-done
}

func TestPluggedInBadUpdateKeepsOldCA(t *testing.T) {
	dir := t.TempDir()
	root := writeCACerts(t, dir, start.Add(30*24*time.Hour))
	a := newPluggedIn(t, dir, clockwork.NewFakeClockAt(start))
	if err := a.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	// A key that does not match ca-cert.pem, as during a half-finished copy.
	other := t.TempDir()
	writeCACerts(t, other, start.Add(30*24*time.Hour))
	key, _ := os.ReadFile(filepath.Join(other, ca.CAKeyFile))
	if err := os.WriteFile(filepath.Join(dir, ca.CAKeyFile), key, 0o600); err != nil {
		t.Fatal(err)
	}
	err := a.Maintain(context.Background())
	if err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("err = %v, want a key mismatch", err)
	}
	if got := issue(t, a, workload); !got.Roots[0].Equal(root) {
		t.Fatal("a broken update replaced the CA")
	}
	// The same broken content is not reported again on every tick.
	if err := a.Maintain(context.Background()); err != nil {
		t.Fatalf("unchanged files reported again: %v", err)
	}
}

func TestPluggedInErrors(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	t.Run("near expiry", func(t *testing.T) {
		dir := t.TempDir()
		writeCACerts(t, dir, start.Add(2*time.Hour))
		err := newPluggedIn(t, dir, clock).Init(context.Background())
		var ce *ca.CoverageError
		if !errors.As(err, &ce) {
			t.Fatalf("err = %v, want *CoverageError", err)
		}
	})
	t.Run("missing file", func(t *testing.T) {
		dir := t.TempDir()
		writeCACerts(t, dir, start.Add(30*24*time.Hour))
		os.Remove(filepath.Join(dir, ca.RootCertFile))
		err := newPluggedIn(t, dir, clock).Init(context.Background())
		if err == nil || !strings.Contains(err.Error(), ca.RootCertFile) {
			t.Fatalf("err = %v, want it to name %s", err, ca.RootCertFile)
		}
	})
	t.Run("wrong root", func(t *testing.T) {
		dir, other := t.TempDir(), t.TempDir()
		writeCACerts(t, dir, start.Add(30*24*time.Hour))
		writeCACerts(t, other, start.Add(30*24*time.Hour))
		r, _ := os.ReadFile(filepath.Join(other, ca.RootCertFile))
		os.WriteFile(filepath.Join(dir, ca.RootCertFile), r, 0o600)
		err := newPluggedIn(t, dir, clock).Init(context.Background())
		if err == nil || !strings.Contains(err.Error(), "does not chain") {
			t.Fatalf("err = %v, want a chain error", err)
		}
	})
	t.Run("key in certificate file", func(t *testing.T) {
		dir := t.TempDir()
		writeCACerts(t, dir, start.Add(30*24*time.Hour))
		k, _ := os.ReadFile(filepath.Join(dir, ca.CAKeyFile))
		os.WriteFile(filepath.Join(dir, ca.CACertFile), k, 0o600)
		err := newPluggedIn(t, dir, clock).Init(context.Background())
		if err == nil || !strings.Contains(err.Error(), `unexpected PEM block "PRIVATE KEY"`) {
			t.Fatalf("err = %v", err)
		}
	})
}
