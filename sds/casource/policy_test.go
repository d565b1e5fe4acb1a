package casource_test

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/casource"
	"github.com/meshca/meshca/sds/sdstest"
)

var (
	strict   = policy.Policy{Enabled: true, Mode: policy.ModeStrict}
	excluded = policy.Policy{Enabled: true, Mode: policy.ModeStrict, Excluded: []string{"legacy.shop.svc.cluster.local"}}
)

func live(t *testing.T, p policy.Policy, rev policy.Revision) *policy.Live {
	t.Helper()
	l := policy.NewLive(nil, nil)
	set(t, l, p, rev)
	return l
}

func set(t *testing.T, l *policy.Live, p policy.Policy, rev policy.Revision) {
	t.Helper()
	n, err := p.Normalize()
	if err != nil {
		t.Fatal(err)
	}
	l.Set(n, rev)
}

// testCtx bounds a test's waits, so a wake that never comes fails the test
// rather than hanging until go test's timeout.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// recv waits for a wake on ch until ctx ends.
func recv(t *testing.T, ctx context.Context, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-ctx.Done():
		t.Fatalf("waiting for %s: %v", what, context.Cause(ctx))
	}
}

func run(t *testing.T, src *casource.Source) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
}

// TestFollowsThePolicy: watchers that ask for the policy get it in their
// first snapshot and every change after, sharing one value; renewals keep
// it; watchers that did not ask are not woken.
func TestFollowsThePolicy(t *testing.T) {
	ctx := testCtx(t)
	clock := clockwork.NewFakeClockAt(time.Now())
	pol := live(t, strict, "1")
	src, err := casource.New(casource.Config{Authority: catest.NewAuthority(t, clock), Policy: pol, TTL: time.Hour, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	run(t, src)

	agentChanges, proxyChanges := make(chan struct{}, 10), make(chan struct{}, 10)
	agent, err := src.Watch(t.Context(), sds.Peer{ID: web}, sds.Want{Cert: true, Roots: true, Policy: true},
		func() { agentChanges <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	defer agent.Close()
	other, err := src.Watch(t.Context(), sds.Peer{}, sds.Want{Roots: true, Policy: true}, func() {})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	proxy, err := src.Watch(t.Context(), sds.Peer{}, sds.Want{Roots: true}, func() { proxyChanges <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()

	first := agent.Snapshot()
	if first.Policy == nil || !first.Policy.Equal(strict) || len(first.Chain) == 0 {
		t.Fatalf("first snapshot: policy %v, chain of %d; want %v and a certificate", first.Policy, len(first.Chain), strict)
	}
	if proxy.Snapshot().Policy != nil {
		t.Error("a watcher that did not ask for the policy holds it")
	}

	set(t, pol, excluded, "2")
	recv(t, ctx, agentChanges, "the policy change")
	s := agent.Snapshot()
	if s.Policy == nil || !s.Policy.Equal(excluded) {
		t.Fatalf("after the change: policy %v, want %v", s.Policy, excluded)
	}
	if s.Chain[0] != first.Chain[0] {
		t.Error("a policy change re-signed the certificate")
	}
	if other.Snapshot().Policy != s.Policy {
		t.Error("watchers hold separate copies of one policy")
	}

	// The renewal at half-life keeps the policy.
	leaf := first.Chain[0]
	clock.Advance(leaf.NotAfter.Sub(clock.Now())/2 + time.Second)
	recv(t, ctx, agentChanges, "the renewal")
	if s := agent.Snapshot(); s.Chain[0] == leaf || s.Policy == nil || !s.Policy.Equal(excluded) {
		t.Fatalf("after the renewal: new leaf %v, policy %v", s.Chain[0] != leaf, s.Policy)
	}

	// Run hands out one change at a time: once the agent has the next, every
	// wake of the first has been sent, whatever order the watchers came in.
	set(t, pol, strict, "3")
	recv(t, ctx, agentChanges, "the second policy change")
	select {
	case <-proxyChanges:
		t.Error("a watcher that did not ask for the policy was woken by its change")
	default:
	}
}

// TestNoPolicyConfigured: without a policy source, asking for it is
// sds.ErrNoPolicy, and the roots are served as before.
func TestNoPolicyConfigured(t *testing.T) {
	src, err := casource.New(casource.Config{Authority: catest.NewAuthority(t, nil)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.Watch(t.Context(), sds.Peer{}, sds.Want{Roots: true, Policy: true}, func() {}); !errors.Is(err, sds.ErrNoPolicy) {
		t.Fatalf("Watch(policy) without one = %v, want sds.ErrNoPolicy", err)
	}
	w, err := src.Watch(t.Context(), sds.Peer{}, sds.Want{Roots: true}, func() {})
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
}

// TestServesThePolicyOverSDS: an SDS server with this source, on a real
// socket, serves a node agent's subscription and pushes a change of the
// store; without a policy source, the name is refused as unknown.
func TestServesThePolicyOverSDS(t *testing.T) {
	ctx := testCtx(t)
	auth := catest.NewAuthority(t, nil)
	pol := live(t, strict, "1")
	withPolicy, err := casource.New(casource.Config{Authority: auth, Policy: pol, RootsOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	run(t, withPolicy)
	without, err := casource.New(casource.Config{Authority: auth, RootsOnly: true})
	if err != nil {
		t.Fatal(err)
	}

	names := []string{sds.RootsName, sds.PolicyName}
	c := sdstest.New(sdstest.Config{Conn: serve(t, withPolicy), Node: "agent", Names: names})
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect()
	holds := func(p policy.Policy) func(sdstest.State) bool {
		return func(s sdstest.State) bool { got, ok := s.Policy(); return ok && got.Equal(p) }
	}
	if _, err := c.Wait(ctx, holds(strict)); err != nil {
		t.Fatal(err)
	}
	set(t, pol, excluded, "2")
	if _, err := c.Wait(ctx, holds(excluded)); err != nil {
		t.Fatal(err)
	}

	refused := sdstest.New(sdstest.Config{Conn: serve(t, without), Node: "agent", Names: names})
	if err := refused.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	defer refused.Disconnect()
	st, err := refused.Wait(ctx, func(s sdstest.State) bool { return !s.Connected })
	if err != nil {
		t.Fatal(err)
	}
	if s := status.Convert(st.Err); s.Code() != codes.InvalidArgument {
		t.Fatalf("subscription to a policy the server lacks ended with %v, want InvalidArgument", st.Err)
	}
}

// serve runs an SDS server for src on a Unix socket and connects to it.
func serve(t *testing.T, src sds.Source) *grpc.ClientConn {
	t.Helper()
	srv, err := sds.New(sds.Config{Source: src})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "sds.sock")
	lis, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	sdstest.Serve(t, srv, lis)
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// TestServesNoPolicyBeforeTheStoreSyncs: a store holds policy.Default
// (mTLS off) until it has read what is stored; that is not served, lest
// agents open plaintext on a policy nobody chose. The first read is,
// even when it changes nothing (no policy stored: Default).
func TestServesNoPolicyBeforeTheStoreSyncs(t *testing.T) {
	ctx := testCtx(t)
	pol := &checkedLive{Live: policy.NewLive(nil, nil), checked: make(chan struct{}, 1)}
	src, err := casource.New(casource.Config{Authority: catest.NewAuthority(t, nil), Policy: pol})
	if err != nil {
		t.Fatal(err)
	}
	run(t, src)
	// Run has found the store unsynced, so only a wake from the store
	// makes it read again.
	recv(t, ctx, pol.checked, "Run to look at the store")
	changes := make(chan struct{}, 10)
	w, err := src.Watch(t.Context(), sds.Peer{}, sds.Want{Roots: true, Policy: true}, func() { changes <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if s := w.Snapshot(); s.Policy != nil || len(s.Roots) == 0 {
		t.Fatalf("before the store synced: policy %v, %d roots; want no policy, the roots", s.Policy, len(s.Roots))
	}
	if pol.Set(policy.Default(), "") {
		t.Fatal("setting Default over Default reported a change; the test needs it not to")
	}
	recv(t, ctx, changes, "the first read of the store to reach the watcher")
	if s := w.Snapshot(); s.Policy == nil || !s.Policy.Equal(policy.Default()) {
		t.Fatalf("after the store synced: policy %v, want %v", s.Policy, policy.Default())
	}
}

// checkedLive tells when it is asked whether it synced.
type checkedLive struct {
	*policy.Live
	checked chan struct{}
}

func (l *checkedLive) Synced() bool {
	defer func() {
		select {
		case l.checked <- struct{}{}:
		default:
		}
	}()
	return l.Live.Synced()
}
