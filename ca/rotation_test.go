package ca_test

import (
	"context"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/keystore"
)

// verifies reports whether chain verifies against a bundle of roots at t.
func verifies(chain []*x509.Certificate, roots []*x509.Certificate, at time.Time) error {
	_, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(td, roots), x509svid.WithTime(at))
	return err
}

func rotate(t *testing.T, a *ca.Authority, step ca.Step) ca.Rotation {
	t.Helper()
	r, err := a.Rotate(context.Background(), step)
	if err != nil {
		t.Fatalf("%s: %v", step, err)
	}
	return r
}

func sameCerts(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}

func TestRotationPhases(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	rootA := e.auth.Issuer().Roots[0]
	intermA := e.auth.Issuer().Cert
	jA, err := ca.LoadJournal(e.journal)
	if err != nil {
		t.Fatal(err)
	}
	leafA := issue(t, e.auth, workload)

	r, err := e.auth.Rotation()
	if err != nil || r.Phase != ca.PhaseIdle || !r.Current.Equal(rootA) {
		t.Fatalf("before rotation: phase %q, err %v; want idle with root A", r.Phase, err)
	}

	// Prepare: B joins the bundle, A keeps signing.
	changed := e.auth.Changed()
	e.clock.Advance(time.Minute)
	r = rotate(t, e.auth, ca.StepPrepare)
	rootB := r.Next
	if r.Phase != ca.PhasePrepared || rootB == nil || rootB.Equal(rootA) || !r.Current.Equal(rootA) {
		t.Fatalf("after prepare: %+v", r)
	}
	if !r.PreparedAt.Equal(e.clock.Now().UTC()) {
		t.Errorf("PreparedAt = %v, want %v", r.PreparedAt, e.clock.Now())
	}
	select {
	case <-changed:
	default:
		t.Error("prepare did not signal a change of bundle")
	}
	if got := e.auth.Issuer().Roots; !sameCerts(got, []*x509.Certificate{rootA, rootB}) {
		t.Fatalf("bundle after prepare has %d roots, want [A, B]", len(got))
	}
	if !e.auth.Issuer().Cert.Equal(intermA) {
		t.Error("prepare replaced the signing intermediate; the new root must sign nothing yet")
	}
	leafPrepared := issue(t, e.auth, workload)
	if err := verifies(leafPrepared.Chain, []*x509.Certificate{rootA}, e.clock.Now()); err != nil {
		t.Errorf("a leaf issued while prepared does not chain to root A: %v", err)
	}
	if _, err := e.auth.Rotate(ctx, ca.StepPrepare); !errors.Is(err, ca.ErrRotationPhase) {
		t.Errorf("second prepare: %v, want ErrRotationPhase", err)
	}
	if _, err := e.auth.Rotate(ctx, ca.StepRetire); !errors.Is(err, ca.ErrRotationPhase) {
		t.Errorf("retire while prepared: %v, want ErrRotationPhase", err)
	}

	// Activate: B signs through a new intermediate; A stays trusted.
	e.clock.Advance(time.Minute)
	r = rotate(t, e.auth, ca.StepActivate)
	if r.Phase != ca.PhaseActivated || !r.Current.Equal(rootB) || len(r.Retiring) != 1 || !r.Retiring[0].Equal(rootA) {
		t.Fatalf("after activate: %+v", r)
	}
	if len(r.RetiringIntermediates) != 1 || !r.RetiringIntermediates[0].Equal(intermA) {
		t.Error("activate did not keep the retiring intermediate on record")
	}
	if got := e.auth.Issuer().Roots; !sameCerts(got, []*x509.Certificate{rootB, rootA}) {
		t.Fatalf("bundle after activate has %d roots, want [B, A]", len(got))
	}
	leafB := issue(t, e.auth, workload)
	if err := verifies(leafB.Chain, []*x509.Certificate{rootB}, e.clock.Now()); err != nil {
		t.Errorf("a leaf issued after activate does not chain to root B: %v", err)
	}
	if !leafB.Root.Equal(rootB) {
		t.Error("Issued.Root is not root B after activate")
	}
	if err := verifies(leafA.Chain, e.auth.Issuer().Roots, e.clock.Now()); err != nil {
		t.Errorf("a leaf of root A no longer verifies against the bundle after activate: %v", err)
	}
	if _, err := e.keys.GetKey(ctx, jA.Current.IntermediateKeyID); !errors.Is(err, keystore.ErrNotFound) {
		t.Error("the retiring intermediate's key still exists after activate")
	}
	if _, err := e.auth.Rotate(ctx, ca.StepActivate); !errors.Is(err, ca.ErrRotationPhase) {
		t.Errorf("second activate: %v, want ErrRotationPhase", err)
	}
	if _, err := e.auth.Rotate(ctx, ca.StepPrepare); !errors.Is(err, ca.ErrRotationPhase) {
		t.Errorf("prepare before retire: %v, want ErrRotationPhase", err)
	}

	// Retire: A leaves the bundle and its key is deleted.
	e.clock.Advance(time.Hour)
	r = rotate(t, e.auth, ca.StepRetire)
	if r.Phase != ca.PhaseIdle || !r.Current.Equal(rootB) || len(r.Retiring) != 0 || !r.ActivatedAt.IsZero() {
		t.Fatalf("after retire: %+v", r)
	}
	if got := e.auth.Issuer().Roots; !sameCerts(got, []*x509.Certificate{rootB}) {
		t.Fatalf("bundle after retire has %d roots, want [B]", len(got))
	}
	if err := verifies(leafA.Chain, e.auth.Issuer().Roots, e.clock.Now()); err == nil {
		t.Error("a leaf of root A still verifies after A retired")
	}
	if err := verifies(leafB.Chain, e.auth.Issuer().Roots, e.clock.Now()); err != nil {
		t.Errorf("a leaf of root B fails after retire: %v", err)
	}
	j, err := ca.LoadJournal(e.journal)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.keys.GetKey(ctx, j.Current.RootKeyID); err != nil {
		t.Errorf("root B's key is gone: %v", err)
	}
	if _, err := e.keys.GetKey(ctx, jA.Current.RootKeyID); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("root A's key after retire: %v, want it deleted", err)
	}

	// A second rotation starts from the new idle state.
	r = rotate(t, e.auth, ca.StepPrepare)
	if r.Phase != ca.PhasePrepared || !r.Current.Equal(rootB) {
		t.Errorf("second rotation's prepare: %+v", r)
	}
}

// Each phase is in the journal before it takes effect, so a restart in any
// phase resumes it: same roots, same order, same signer.
func TestRotationSurvivesRestart(t *testing.T) {
	for _, steps := range [][]ca.Step{
		{ca.StepPrepare},
		{ca.StepPrepare, ca.StepActivate},
		{ca.StepPrepare, ca.StepActivate, ca.StepRetire},
	} {
		last := steps[len(steps)-1]
		t.Run(string(last), func(t *testing.T) {
			e := newEnv(t)
			for _, s := range steps {
				e.clock.Advance(time.Minute)
				rotate(t, e.auth, s)
			}
			before, _ := e.auth.Rotation()
			iss := e.auth.Issuer()

			restarted := newSelfManaged(t, e.keys, e.journal, e.clock)
			after, err := restarted.Rotation()
			if err != nil {
				t.Fatal(err)
			}
			if after.Phase != before.Phase || !sameCerts(after.Bundle(), before.Bundle()) {
				t.Errorf("after restart: phase %s with %d roots, want %s with %d", after.Phase, len(after.Bundle()), before.Phase, len(before.Bundle()))
			}
			if !restarted.Issuer().Cert.Equal(iss.Cert) || !sameCerts(restarted.Issuer().Roots, iss.Roots) {
				t.Error("after restart the issuer or bundle differs")
			}
			leaf := issue(t, restarted, workload)
			if err := verifies(leaf.Chain, []*x509.Certificate{after.Current}, e.clock.Now()); err != nil {
				t.Errorf("after restart leaves do not chain to the current root: %v", err)
			}
		})
	}
}

// Renewing the intermediate mid-rotation keeps every root in the bundle.
func TestRenewalDuringRotationKeepsBundle(t *testing.T) {
	e := newEnv(t)
	rotate(t, e.auth, ca.StepPrepare)
	prepared := e.auth.Issuer().Roots
	e.clock.Advance(25 * time.Hour)
	if err := e.auth.Maintain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !sameCerts(e.auth.Issuer().Roots, prepared) {
		t.Fatal("intermediate renewal while prepared changed the bundle")
	}
	rotate(t, e.auth, ca.StepActivate)
	activated := e.auth.Issuer().Roots
	old := e.auth.Issuer().Cert
	e.clock.Advance(25 * time.Hour)
	if err := e.auth.Maintain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if e.auth.Issuer().Cert.Equal(old) {
		t.Fatal("intermediate not renewed")
	}
	if !sameCerts(e.auth.Issuer().Roots, activated) {
		t.Fatal("intermediate renewal while activated changed the bundle")
	}
	if err := verifies(issue(t, e.auth, workload).Chain, activated[:1], e.clock.Now()); err != nil {
		t.Errorf("renewed intermediate does not chain to the new root: %v", err)
	}
}

// A step whose journal cannot be written changes nothing.
func TestRotationStepFailsWithoutJournal(t *testing.T) {
	e := newEnv(t)
	before := e.auth.Issuer()
	dir := filepath.Dir(e.journal)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := e.auth.Rotate(context.Background(), ca.StepPrepare); err == nil {
		t.Fatal("prepare with an unwritable journal succeeded")
	}
	if e.auth.Issuer() != before {
		t.Error("a failed prepare changed the issuer")
	}
	if r, _ := e.auth.Rotation(); r.Phase != ca.PhaseIdle {
		t.Errorf("phase after a failed prepare: %s, want idle", r.Phase)
	}
}

func TestRotationUnsupportedForPluggedIn(t *testing.T) {
	dir := t.TempDir()
	clock := clockwork.NewFakeClockAt(start)
	writeCACerts(t, dir, start.Add(30*24*time.Hour))
	a := newPluggedIn(t, dir, clock)
	if err := a.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Rotation(); !errors.Is(err, ca.ErrRotationUnsupported) {
		t.Errorf("Rotation: %v, want ErrRotationUnsupported", err)
	}
	if _, err := a.Rotate(context.Background(), ca.StepPrepare); !errors.Is(err, ca.ErrRotationUnsupported) {
		t.Errorf("Rotate: %v, want ErrRotationUnsupported", err)
	}
}

// A journal written before rotation existed (version 1) still loads.
func TestJournalVersion1Loads(t *testing.T) {
	e := newEnv(t)
	data, err := os.ReadFile(e.journal)
	if err != nil {
		t.Fatal(err)
	}
	v1 := strings.Replace(string(data), `"version": 2`, `"version": 1`, 1)
	if v1 == string(data) {
		t.Fatal("journal does not carry version 2")
	}
	if err := os.WriteFile(e.journal, []byte(v1), 0o600); err != nil {
		t.Fatal(err)
	}
	a := newSelfManaged(t, e.keys, e.journal, e.clock)
	if r, err := a.Rotation(); err != nil || r.Phase != ca.PhaseIdle {
		t.Errorf("v1 journal: phase %s, err %v", r.Phase, err)
	}
}
