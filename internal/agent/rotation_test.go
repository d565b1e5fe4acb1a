package agent_test

import (
	"testing"
	"time"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// When the server's bundle puts a new root first (a rotation was
// activated), the agent renews within its rotation window, at the
// jittered point, not at its usual renewal time; a bundle that merely adds
// a root (prepare) renews nothing.
func TestRenewsEarlyWhenANewRootSigns(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	cfg := m.config(t, "default", "web")
	cfg.TTL = 23 * time.Hour // at least clockLag, to be valid in real time
	cfg.RotationWindow = 10 * time.Minute
	cfg.Rand = func() float64 { return 0.5 }
	a := m.startReady(t, ctx, cfg)
	proxy := envoy(t, ctx, a, "web", false)
	first := leafOf(t, wait(t, ctx, proxy, holdsSerial(t, a.Status().Serial)))

	if _, err := m.first.Rotate(ctx, ca.StepPrepare); err != nil {
		t.Fatal(err)
	}
	next := m.first.Issuer().Roots[1]
	m.setBundle(t, m.first.Issuer().Roots...)
	wait(t, ctx, proxy, holdsRoot(next))
	if _, err := m.first.Rotate(ctx, ca.StepActivate); err != nil {
		t.Fatal(err)
	}
	activated := m.clock.Now()
	m.setBundle(t, m.first.Issuer().Roots...) // [next, old]
	wait(t, ctx, proxy, func(s sdstest.State) bool {
		return s.Secrets[sds.RootsName].Version != "" && len(a.Status().Roots) == 2 && a.Status().Roots[0] == ca.Fingerprint(next)
	})
	if n := fetchCount(m); n != 1 {
		t.Fatalf("%d certificate requests before the rotation window, want 1", n)
	}

	due := activated.Add(5 * time.Minute) // half the window: Rand 0.5
	blockUntil(t, ctx, m.clock, 1)
	advanceTo(t, m.clock, due.Add(-time.Millisecond))
	blockUntil(t, ctx, m.clock, 1)
	if n := fetchCount(m); n != 1 {
		t.Fatalf("%d certificate requests a millisecond before the jittered time, want 1", n)
	}
	advanceTo(t, m.clock, due)
	second := leafOf(t, wait(t, ctx, proxy, func(s sdstest.State) bool {
		l := leafOf(t, s)
		return l != nil && !l.Equal(first)
	}))
	if err := second.CheckSignatureFrom(m.first.Issuer().Cert); err != nil {
		t.Errorf("the early renewal is not signed by the new root's intermediate: %v", err)
	}
	// The next renewal is the usual one again.
	if got := a.Status().NextRenewal; got.Sub(due) < 23*time.Hour*4/10 {
		t.Errorf("next renewal at %s, only %s after the early one", got, got.Sub(due))
	}
}
