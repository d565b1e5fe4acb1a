package casource_test

import (
	"context"
	"crypto"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/casource"
)

var web = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/web")

// switchable is an Authority whose CA a test swaps, standing in for a root
// rotation the CA does not support yet.
type switchable struct {
	mu      sync.Mutex
	cur     *ca.Authority
	changed chan struct{}
	signs   atomic.Int32
}

func (s *switchable) get() *ca.Authority {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

func (s *switchable) Issuer() *ca.Issuer { return s.get().Issuer() }

func (s *switchable) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

func (s *switchable) SignKey(ctx context.Context, pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration) (*ca.Issued, error) {
	s.signs.Add(1)
	return s.get().SignKey(ctx, pub, id, ttl)
}

func (s *switchable) swap(a *ca.Authority) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cur = a
	close(s.changed)
	s.changed = make(chan struct{})
}

func TestRenewsAtHalfLifeAndOnRootChange(t *testing.T) {
	clock := clockwork.NewFakeClockAt(time.Now())
	auth := &switchable{cur: catest.NewAuthority(t, clock), changed: make(chan struct{})}
	src, err := casource.New(casource.Config{Authority: auth, TTL: time.Hour, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(testCtx(t))
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	defer func() { cancel(); <-done }()

	changes := make(chan struct{}, 10)
	w, err := src.Watch(ctx, sds.Peer{ID: web}, sds.Want{Cert: true, Roots: true}, func() { changes <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	first := w.Snapshot()
	leaf := first.Chain[0]
	if got := leaf.URIs[0].String(); got != web.String() || len(first.Roots) != 1 {
		t.Fatalf("first snapshot: leaf %s, %d roots", got, len(first.Roots))
	}
	// Half of the lifetime left at issuance: NotBefore is backdated.
	issuedAt := clock.Now()
	half := issuedAt.Add(leaf.NotAfter.Sub(issuedAt) / 2)

	clock.Advance(half.Sub(clock.Now()) - time.Second)
	select {
	case <-changes:
		t.Fatal("renewed before half of the lifetime")
	default:
	}
	clock.Advance(time.Second)
	recv(t, ctx, changes, "the renewal at half-life")
	second := w.Snapshot()
	if second.Chain[0].SerialNumber.Cmp(leaf.SerialNumber) == 0 || second.Key == first.Key {
		t.Fatal("renewal kept the certificate or the key")
	}

	// A new root replaces the certificate at once.
	signs := auth.signs.Load()
	auth.swap(catest.NewAuthority(t, clock))
	recv(t, ctx, changes, "the renewal for the new root")
	third := w.Snapshot()
	if auth.signs.Load() != signs+1 || third.Chain[0].SerialNumber.Cmp(second.Chain[0].SerialNumber) == 0 {
		t.Fatal("the certificate was not replaced when its root left the bundle")
	}
	if !third.Roots[0].Equal(auth.Issuer().Roots[0]) {
		t.Fatal("the bundle was not updated")
	}
}

func TestRootsOnlyAndUnauthenticated(t *testing.T) {
	a := catest.NewAuthority(t, nil)
	src, err := casource.New(casource.Config{Authority: a, RootsOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.Watch(context.Background(), sds.Peer{ID: web}, sds.Want{Cert: true}, func() {}); err == nil || !strings.Contains(err.Error(), "node agent") {
		t.Fatalf("certificate from a roots-only source: %v", err)
	}
	w, err := src.Watch(context.Background(), sds.Peer{}, sds.Want{Roots: true}, func() {})
	if err != nil || len(w.Snapshot().Roots) != 1 || len(w.Snapshot().Chain) != 0 {
		t.Fatalf("roots for an anonymous proxy: %v", err)
	}
	w.Close()
	open, _ := casource.New(casource.Config{Authority: a})
	if _, err := open.Watch(context.Background(), sds.Peer{}, sds.Want{Cert: true}, func() {}); err == nil || !strings.Contains(err.Error(), "authenticated") {
		t.Fatalf("certificate for an unauthenticated proxy: %v", err)
	}
}

type recorder struct {
	mu   sync.Mutex
	recs []audit.Record
	fail bool
}

func (r *recorder) Append(_ context.Context, rec audit.Record) (audit.Record, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail {
		return audit.Record{}, errors.New("disk full")
	}
	r.recs = append(r.recs, rec)
	return rec, nil
}

func (r *recorder) roots() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, rec := range r.recs {
		out = append(out, rec.RootFingerprint)
	}
	return out
}

// After a root activation each certificate from the old root is replaced
// within the jitter window, not at once and not at half-life; every
// certificate is in the ledger before it is served.
func TestRenewsAfterActivationWithJitter(t *testing.T) {
	clock := clockwork.NewFakeClockAt(time.Now())
	auth := catest.NewAuthority(t, clock)
	led := &recorder{}
	src, err := casource.New(casource.Config{Authority: auth, TTL: time.Hour, Clock: clock, Ledger: led,
		RotationJitter: time.Minute, Rand: func() float64 { return 0.5 }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(testCtx(t))
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	defer func() { cancel(); <-done }()

	changes := make(chan struct{}, 10)
	w, err := src.Watch(ctx, sds.Peer{ID: web, Addr: "10.0.0.7:4000"}, sds.Want{Cert: true, Roots: true}, func() { changes <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	rootA := ca.Fingerprint(auth.Issuer().Roots[0])
	if got := led.roots(); len(got) != 1 || got[0] != rootA {
		t.Fatalf("ledger after the first certificate: %v", got)
	}
	led.mu.Lock()
	if r := led.recs[0]; r.SPIFFEID != web.String() || r.Namespace != "default" || r.ServiceAccount != "web" || r.Peer != "10.0.0.7:4000" || r.Serial == "" {
		t.Errorf("issuance record: %+v", r)
	}
	led.mu.Unlock()
	first := w.Snapshot()

	if _, err := auth.Rotate(ctx, ca.StepPrepare); err != nil {
		t.Fatal(err)
	}
	recv(t, ctx, changes, "the prepared root")
	if s := w.Snapshot(); len(s.Roots) != 2 || s.Chain[0] != first.Chain[0] {
		t.Fatal("prepare must push the bundle and keep the certificate")
	}
	if _, err := auth.Rotate(ctx, ca.StepActivate); err != nil {
		t.Fatal(err)
	}
	recv(t, ctx, changes, "the reordered bundle")
	if s := w.Snapshot(); s.Chain[0] != first.Chain[0] {
		t.Fatal("the certificate was replaced at once, not within the jitter window")
	}
	clock.Advance(29 * time.Second)
	select {
	case <-changes:
		t.Fatal("renewed before the jittered time")
	default:
	}
	clock.Advance(time.Second)
	recv(t, ctx, changes, "the jittered renewal")
	s := w.Snapshot()
	rootB := ca.Fingerprint(auth.Issuer().Roots[0])
	if ca.Fingerprint(s.Chain[len(s.Chain)-1]) == ca.Fingerprint(first.Chain[len(first.Chain)-1]) {
		t.Fatal("the renewed certificate has the old intermediate")
	}
	if got := led.roots(); len(got) != 2 || got[1] != rootB {
		t.Fatalf("ledger roots after the renewal: %v, want [A, B]", got)
	}

	// With the ledger down, nothing new is served.
	led.mu.Lock()
	led.fail = true
	led.mu.Unlock()
	if _, err := src.Watch(ctx, sds.Peer{ID: web}, sds.Want{Cert: true}, func() {}); err == nil || !strings.Contains(err.Error(), "audit ledger is unavailable") {
		t.Fatalf("Watch with the ledger down: %v", err)
	}
}
