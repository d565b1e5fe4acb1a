package rotation_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/internal/rotation/rotationtest"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/sds"
)

var start = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

type env struct {
	clock   *clockwork.FakeClock
	auth    *ca.Authority
	proxies *rotationtest.Proxies
	ledger  *rotationtest.Ledger
	rot     *rotation.Rotator
	reg     *prometheus.Registry
}

func newEnv(t *testing.T, mutate func(*rotation.Config)) *env {
	t.Helper()
	e := &env{clock: clockwork.NewFakeClockAt(start), proxies: &rotationtest.Proxies{}, ledger: &rotationtest.Ledger{}, reg: prometheus.NewRegistry()}
	e.auth = catest.NewAuthority(t, e.clock)
	cfg := rotation.Config{CA: e.auth, Proxies: e.proxies, Ledger: e.ledger, Clock: e.clock, Metrics: e.reg}
	if mutate != nil {
		mutate(&cfg)
	}
	var err error
	if e.rot, err = rotation.New(cfg); err != nil {
		t.Fatal(err)
	}
	return e
}

func id(sa string) spiffeid.ID {
	return spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/" + sa)
}

// stream is a connected ROOTCA stream of sa that has ACKed the given roots.
func stream(sa string, acked ...string) sds.StreamStatus {
	return sds.StreamStatus{Peer: sds.Peer{ID: id(sa), Node: sa + "-node"}, Subscribed: []string{sds.RootsName},
		AckedRoots: acked}
}

func holding(sa, rootFP string, notAfter time.Time) rotation.Holding {
	return rotation.Holding{SPIFFEID: id(sa).String(), RootFingerprint: rootFP, NotAfter: notAfter}
}

func (e *env) step(t *testing.T, step ca.Step, opts rotation.Options) rotation.Status {
	t.Helper()
	st, err := e.rot.Step(context.Background(), step, opts)
	if err != nil {
		t.Fatalf("%s: %v", step, err)
	}
	return st
}

func (e *env) fingerprints(t *testing.T) (current, next string) {
	t.Helper()
	r, err := e.auth.Rotation()
	if err != nil {
		t.Fatal(err)
	}
	current = ca.Fingerprint(r.Current)
	if r.Next != nil {
		next = ca.Fingerprint(r.Next)
	}
	return current, next
}

func TestActivateWaitsForEveryProxy(t *testing.T) {
	e := newEnv(t, nil)
	a, _ := e.fingerprints(t)
	e.step(t, ca.StepPrepare, rotation.Options{})
	_, b := e.fingerprints(t)

	e.proxies.Set(stream("web", a, b), stream("db", a))
	_, err := e.rot.Step(context.Background(), ca.StepActivate, rotation.Options{})
	if !errors.Is(err, rotation.ErrBlocked) {
		t.Fatalf("activate with one proxy behind: %v, want ErrBlocked", err)
	}
	for _, want := range []string{"1 of 2 proxies", "1 missing", "1 connected but not ACKed yet"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not say %q", err, want)
		}
	}
	if got := testenv.GatheredValue(t, e.reg, "meshca_root_rotation_refused_total", nil); got != 1 {
		t.Errorf("refused metric = %v, want 1", got)
	}
	st, err := e.rot.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.NextStep != ca.StepActivate || len(st.Missing) != 1 || st.Missing[0].Identity != id("db").String() || st.Missing[0].State != "pending" {
		t.Errorf("status names the wrong missing proxies: %+v", st.Missing)
	}
	if st.Roots[1].Slot != rotation.SlotNext || st.Roots[1].AckedProxies != 1 || st.Roots[0].AckedProxies != 2 {
		t.Errorf("ACK counts per root: %+v", st.Roots)
	}
	if r, _ := e.auth.Rotation(); r.Phase != ca.PhasePrepared {
		t.Fatalf("a refused activate changed the phase to %s", r.Phase)
	}

	e.proxies.Set(stream("web", a, b), stream("db", a, b))
	st = e.step(t, ca.StepActivate, rotation.Options{})
	if st.Phase != ca.PhaseActivated || st.Roots[0].Fingerprint != b || st.Roots[1].Slot != rotation.SlotRetiring {
		t.Errorf("after activate: %+v", st)
	}
}

func TestActivateCountsNACKsAndDisconnectedHolders(t *testing.T) {
	e := newEnv(t, nil)
	a, _ := e.fingerprints(t)
	e.step(t, ca.StepPrepare, rotation.Options{})
	_, b := e.fingerprints(t)

	nack := stream("web", a)
	nack.RejectedRoots, nack.LastNACK = []string{a, b}, "bad bundle"
	e.proxies.Set(nack, stream("db", a, b))
	// "cache" holds a live certificate and has no stream; "db" has both.
	e.ledger.Add(holding("cache", a, start.Add(time.Hour)))
	e.ledger.Add(holding("db", a, start.Add(time.Hour)))

	st, err := e.rot.Step(context.Background(), ca.StepActivate, rotation.Options{})
	if !errors.Is(err, rotation.ErrBlocked) {
		t.Fatalf("activate: %v, want ErrBlocked", err)
	}
	for _, want := range []string{"1 of 3 proxies", "1 rejected it (NACK)", "1 hold a live certificate but have no SDS stream"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not say %q", err, want)
		}
	}
	want := map[string]string{id("web").String(): "rejected", id("cache").String(): "disconnected"}
	if len(st.Missing) != len(want) {
		t.Fatalf("missing = %+v, want %v", st.Missing, want)
	}
	for _, p := range st.Missing {
		if want[p.Identity] != p.State {
			t.Errorf("%s is %q, want %q", p.Identity, p.State, want[p.Identity])
		}
		if p.State == "rejected" && p.Error != "bad bundle" {
			t.Errorf("rejected proxy's error = %q", p.Error)
		}
	}

	// A third of the proxies is not enough for 50 %; two thirds is.
	if _, err := e.rot.Step(context.Background(), ca.StepActivate, rotation.Options{MinAcked: 0.5}); !errors.Is(err, rotation.ErrBlocked) {
		t.Fatalf("activate at 50%% with 1 of 3: %v, want ErrBlocked", err)
	}
	e.proxies.Set(stream("web", a, b), stream("db", a, b))
	st = e.step(t, ca.StepActivate, rotation.Options{MinAcked: 0.5})
	if st.Phase != ca.PhaseActivated {
		t.Errorf("activate at 50%% with 2 of 3: phase %s", st.Phase)
	}
	if _, err := e.rot.Step(context.Background(), ca.StepRetire, rotation.Options{MinAcked: 1.5}); err == nil {
		t.Error("MinAcked 1.5 accepted")
	}
}

func TestForceActivateWarns(t *testing.T) {
	e := newEnv(t, nil)
	a, _ := e.fingerprints(t)
	e.step(t, ca.StepPrepare, rotation.Options{})
	e.proxies.Set(stream("web", a))
	st := e.step(t, ca.StepActivate, rotation.Options{Force: true})
	if st.Phase != ca.PhaseActivated {
		t.Fatalf("forced activate: phase %s", st.Phase)
	}
	if len(st.Warnings) != 1 || !strings.Contains(st.Warnings[0], "activate forced although: 0 of 1 proxies") {
		t.Errorf("warnings = %q", st.Warnings)
	}
}

func TestNoProxiesNoWait(t *testing.T) {
	e := newEnv(t, nil)
	e.step(t, ca.StepPrepare, rotation.Options{})
	if st := e.step(t, ca.StepActivate, rotation.Options{}); st.Phase != ca.PhaseActivated {
		t.Errorf("activate with no proxies and no live certificates: phase %s", st.Phase)
	}
}

func TestRetireWaitsForLiveLeaves(t *testing.T) {
	e := newEnv(t, nil)
	a, _ := e.fingerprints(t)
	e.ledger.Add(holding("web", a, start.Add(30*time.Minute)))
	e.ledger.Add(holding("db", a, start.Add(45*time.Minute)))
	e.proxies.Set() // nobody connected: the holders count as disconnected
	e.step(t, ca.StepPrepare, rotation.Options{Force: true})
	e.step(t, ca.StepActivate, rotation.Options{Force: true})
	_, err := e.rot.Step(context.Background(), ca.StepRetire, rotation.Options{})
	if !errors.Is(err, rotation.ErrBlocked) || !strings.Contains(err.Error(), "2 live certificate(s) still chain to retiring root") ||
		!strings.Contains(err.Error(), "in 45m0s") {
		t.Fatalf("retire with live leaves: %v", err)
	}
	st, _ := e.rot.Status(context.Background())
	if st.Roots[1].LiveLeaves != 2 || !st.Roots[1].LiveLeavesExpireBy.Equal(start.Add(45*time.Minute)) {
		t.Errorf("retiring root status: %+v", st.Roots[1])
	}
	e.clock.Advance(44 * time.Minute)
	if _, err := e.rot.Step(context.Background(), ca.StepRetire, rotation.Options{}); !errors.Is(err, rotation.ErrBlocked) ||
		!strings.Contains(err.Error(), "1 live certificate(s)") {
		t.Fatalf("retire with one live leaf: %v", err)
	}
	e.clock.Advance(time.Minute)
	if st := e.step(t, ca.StepRetire, rotation.Options{}); st.Phase != ca.PhaseIdle || len(st.Roots) != 1 {
		t.Errorf("retire after the last leaf expired: %+v", st)
	}
}

func TestScheduleDue(t *testing.T) {
	e := newEnv(t, func(c *rotation.Config) { c.Schedule.Enabled = true })
	r, _ := e.auth.Rotation()
	life := r.Current.NotAfter.Sub(r.Current.NotBefore)
	half := r.Current.NotBefore.Add(life / 2)
	if step, due := e.rot.Due(r, half.Add(-time.Second)); step != ca.StepPrepare || due {
		t.Errorf("just before half-life: %s due=%v", step, due)
	}
	if step, due := e.rot.Due(r, half); step != ca.StepPrepare || !due {
		t.Errorf("at half-life: %s due=%v", step, due)
	}
	e.step(t, ca.StepPrepare, rotation.Options{})
	r, _ = e.auth.Rotation()
	act := r.Current.NotBefore.Add(time.Duration(float64(life) * 5 / 6))
	if step, due := e.rot.Due(r, act.Add(-time.Second)); step != ca.StepActivate || due {
		t.Errorf("just before 5/6: %s due=%v", step, due)
	}
	if step, due := e.rot.Due(r, act); step != ca.StepActivate || !due {
		t.Errorf("at 5/6: %s due=%v", step, due)
	}
}

func TestScheduleRunsTheRotation(t *testing.T) {
	e := newEnv(t, func(c *rotation.Config) { c.Schedule.Enabled = true; c.Interval = time.Hour })
	r, _ := e.auth.Rotation()
	a := ca.Fingerprint(r.Current)
	life := r.Current.NotAfter.Sub(r.Current.NotBefore)
	e.proxies.Set(stream("web", a))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- e.rot.Run(ctx) }()

	phase := func() ca.Phase { r, _ := e.auth.Rotation(); return r.Phase }
	advanceUntil := func(want ca.Phase, d time.Duration) {
		t.Helper()
		for range 2000 {
			if phase() == want {
				return
			}
			if err := e.clock.BlockUntilContext(ctx, 1); err != nil {
				t.Fatal(err)
			}
			e.clock.Advance(d)
		}
		t.Fatalf("phase stays %s, want %s", phase(), want)
	}
	advanceUntil(ca.PhasePrepared, 24*time.Hour)
	if now := e.clock.Now(); now.Before(r.Current.NotBefore.Add(life / 2)) {
		t.Errorf("prepared at %v, before half of the root's lifetime", now)
	}
	// Past 5/6 of the lifetime, activation still waits for the proxy.
	for e.clock.Now().Before(r.Current.NotBefore.Add(life * 5 / 6).Add(time.Hour)) {
		if err := e.clock.BlockUntilContext(ctx, 1); err != nil {
			t.Fatal(err)
		}
		e.clock.Advance(24 * time.Hour)
	}
	if err := e.clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if p := phase(); p != ca.PhasePrepared {
		t.Fatalf("activated without the proxy's ACK: phase %s", p)
	}
	_, b := e.fingerprints(t)
	e.proxies.Set(stream("web", a, b))
	advanceUntil(ca.PhaseIdle, time.Second)
	r2, _ := e.auth.Rotation()
	if ca.Fingerprint(r2.Current) != b {
		t.Error("the schedule did not end on the new root")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// leadership is a switchable rotation.Leadership.
type leadership struct {
	mu     sync.Mutex
	leads  bool
	leader string
}

func (l *leadership) set(leads bool, leader string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.leads, l.leader = leads, leader
}

func (l *leadership) IsLeader() bool { l.mu.Lock(); defer l.mu.Unlock(); return l.leads }
func (l *leadership) Leader() string { l.mu.Lock(); defer l.mu.Unlock(); return l.leader }

// Only the leader steps, by hand or on schedule; a follower names it.
func TestOnlyTheLeaderSteps(t *testing.T) {
	l := &leadership{}
	e := newEnv(t, func(c *rotation.Config) { c.Leader = l; c.Schedule.Enabled = true; c.Interval = time.Hour })
	ctx := context.Background()
	for _, c := range []struct{ leader, want string }{{"", "no replica leads yet"}, {"meshca-1", "meshca-1 leads"}} {
		l.set(false, c.leader)
		_, err := e.rot.Step(ctx, ca.StepPrepare, rotation.Options{Force: true})
		if !errors.Is(err, rotation.ErrNotLeader) || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("prepare on a follower: err = %v, want ErrNotLeader saying %q", err, c.want)
		}
	}
	if st, err := e.rot.Status(ctx); err != nil || st.Leader != "meshca-1" {
		t.Fatalf("status on a follower: leader %q, %v", st.Leader, err)
	}

	// Far past the prepare point, a follower's schedule does nothing.
	r, _ := e.auth.Rotation()
	e.clock.Advance(r.Current.NotAfter.Sub(e.clock.Now()) * 2 / 3)
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- e.rot.Run(runCtx) }()
	for range 3 {
		if err := e.clock.BlockUntilContext(runCtx, 1); err != nil {
			t.Fatal(err)
		}
		e.clock.Advance(time.Hour)
	}
	if r, _ := e.auth.Rotation(); r.Phase != ca.PhaseIdle {
		t.Fatalf("a follower's schedule stepped to %s", r.Phase)
	}
	l.set(true, "me")
	for range 100 {
		if r, _ := e.auth.Rotation(); r.Phase == ca.PhasePrepared {
			break
		}
		if err := e.clock.BlockUntilContext(runCtx, 1); err != nil {
			t.Fatal(err)
		}
		e.clock.Advance(time.Hour)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if r, _ := e.auth.Rotation(); r.Phase != ca.PhasePrepared {
		t.Fatalf("once leading, the schedule did not prepare: phase %s", r.Phase)
	}
}
