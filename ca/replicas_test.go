package ca_test

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/keystore/memory"
)

// flakyKeys is a keystore that can be taken down, as a remote one can.
type flakyKeys struct {
	*memory.Store
	down  atomic.Bool
	calls atomic.Int64

	mu        sync.Mutex
	generated []string
}

var errDown = fmt.Errorf("test keystore: %w", keystore.ErrUnavailable)

func (k *flakyKeys) GenerateKey(ctx context.Context, id string, kt keystore.KeyType) (crypto.Signer, error) {
	k.calls.Add(1)
	if k.down.Load() {
		return nil, errDown
	}
	k.mu.Lock()
	k.generated = append(k.generated, id)
	k.mu.Unlock()
	return k.Store.GenerateKey(ctx, id, kt)
}

func (k *flakyKeys) GetKey(ctx context.Context, id string) (crypto.Signer, error) {
	k.calls.Add(1)
	if k.down.Load() {
		return nil, errDown
	}
	return k.Store.GetKey(ctx, id)
}

// replica is one server process's CA over a shared journal and keystore.
func replica(t *testing.T, keys ca.KeyStore, journal ca.JournalStore, clock clockwork.Clock, reg prometheus.Registerer) *ca.Authority {
	t.Helper()
	src, err := ca.NewSelfManaged(ca.SelfManagedConfig{TrustDomain: td, Keys: keys, Journal: journal,
		PerReplicaIntermediates: true, IntermediateTTL: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.New(ca.Config{TrustDomain: td, Source: src, Clock: clock, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	return a
}

func TestPerReplicaIntermediates(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	keys := &flakyKeys{Store: memory.New()}
	path := filepath.Join(t.TempDir(), "journal.json")
	a := replica(t, keys, ca.FileJournal{Path: path}, clock, nil)
	b := replica(t, keys, ca.FileJournal{Path: path}, clock, nil)

	ia, ib := a.Issuer(), b.Issuer()
	if !ia.Roots[0].Equal(ib.Roots[0]) {
		t.Fatal("two replicas of one journal made different roots")
	}
	if ia.Cert.Equal(ib.Cert) {
		t.Fatal("replicas share an intermediate; each should sign its own")
	}
	j, err := ca.LoadJournal(path)
	if err != nil {
		t.Fatal(err)
	}
	if j.Current.IntermediateCertPEM != "" || j.Current.IntermediateKeyID != "" {
		t.Fatal("a per-replica intermediate was written to the shared journal")
	}
	if _, err := keys.GetKey(context.Background(), j.Current.RootKeyID); err != nil {
		t.Fatalf("root key not in the keystore: %v", err)
	}

	// Leaves are signed locally: issuing touches the keystore not at all.
	before := keys.calls.Load()
	for _, auth := range []*ca.Authority{a, b} {
		leaf := issue(t, auth, workload)
		if err := verifies(leaf.Chain, ia.Roots, clock.Now()); err != nil {
			t.Fatalf("leaf does not verify against the shared root: %v", err)
		}
	}
	if n := keys.calls.Load() - before; n != 0 {
		t.Fatalf("issuing two leaves made %d keystore calls, want 0", n)
	}

	// Renewal at half of the 24h lifetime signs a new local intermediate.
	clock.Advance(12*time.Hour + time.Minute)
	if err := a.Maintain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if a.Issuer().Cert.Equal(ia.Cert) {
		t.Fatal("the intermediate was not renewed at half-life")
	}
	if r, err := a.Rotation(); err != nil || !r.Intermediate.Equal(a.Issuer().Cert) {
		t.Fatalf("Rotation().Intermediate is not this replica's intermediate (err %v)", err)
	}
}

// A rotation driven by one replica is followed by the other from the
// journal alone: the bundle grows at prepare, the other replica signs under
// the new root after activate, and the bundle shrinks at retire.
func TestReplicaFollowsRotation(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	keys := &flakyKeys{Store: memory.New()}
	path := filepath.Join(t.TempDir(), "journal.json")
	leader := replica(t, keys, ca.FileJournal{Path: path}, clock, nil)
	follower := replica(t, keys, ca.FileJournal{Path: path}, clock, nil)
	ctx := context.Background()
	rootA := follower.Issuer().Roots[0]

	r := rotate(t, leader, ca.StepPrepare)
	if err := follower.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	if !sameCerts(follower.Issuer().Roots, []*x509.Certificate{rootA, r.Next}) {
		t.Fatal("follower's bundle after prepare is not [A, B]")
	}
	if !follower.Issuer().Roots[0].Equal(rootA) {
		t.Fatal("follower signs under the prepared root before activation")
	}

	rotate(t, leader, ca.StepActivate)
	if err := follower.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	fi := follower.Issuer()
	if !fi.Roots[0].Equal(r.Next) || !sameCerts(fi.Roots, []*x509.Certificate{r.Next, rootA}) {
		t.Fatal("follower's bundle after activate is not [B, A]")
	}
	if err := verifies(issue(t, follower, workload).Chain, []*x509.Certificate{r.Next}, clock.Now()); err != nil {
		t.Fatalf("follower's leaf after activate does not chain to the new root alone: %v", err)
	}

	rotate(t, leader, ca.StepRetire)
	if err := follower.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	if !sameCerts(follower.Issuer().Roots, []*x509.Certificate{r.Next}) {
		t.Fatal("follower's bundle after retire is not [B]")
	}
	// The follower writes nothing while it follows.
	j, err := ca.LoadJournal(path)
	if err != nil || j.Current.IntermediateCertPEM != "" {
		t.Fatalf("journal after retire: %v", err)
	}
}

// raceJournal lets another replica write first, once, between a replica's
// read of the journal and its write: the race the compare-and-swap is for.
type raceJournal struct {
	ca.FileJournal
	before func()
	once   sync.Once
}

func (r *raceJournal) Save(ctx context.Context, data []byte, rev string) (string, error) {
	if r.before != nil {
		r.once.Do(r.before)
	}
	return r.FileJournal.Save(ctx, data, rev)
}

// A step that loses a race with another replica's is refused, not written
// over it, and leaves no key behind; the loser follows the winner at its
// next pass.
func TestConcurrentStepsDoNotOverwrite(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	keys := &flakyKeys{Store: memory.New()}
	path := filepath.Join(t.TempDir(), "journal.json")
	a := replica(t, keys, ca.FileJournal{Path: path}, clock, nil)
	racy := &raceJournal{FileJournal: ca.FileJournal{Path: path}}
	b := replica(t, keys, racy, clock, nil)

	var ra ca.Rotation
	racy.before = func() { ra = rotate(t, a, ca.StepPrepare) }
	generated := len(keys.generated)
	if _, err := b.Rotate(context.Background(), ca.StepPrepare); !errors.Is(err, ca.ErrJournalConflict) {
		t.Fatalf("prepare that lost the race: err = %v, want ErrJournalConflict", err)
	}
	j, err := ca.LoadJournal(path)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ca.ParseCerts([]byte(j.Next.RootCertPEM)); err != nil || !got[0].Equal(ra.Next) {
		t.Fatal("the losing prepare replaced the winner's next root")
	}
	if n := len(keys.generated) - generated; n != 2 {
		t.Fatalf("%d root keys generated, want one per prepare", n)
	}
	for _, id := range keys.generated[generated:] {
		_, err := keys.Store.GetKey(context.Background(), id)
		if id == j.Next.RootKeyID && err != nil {
			t.Fatalf("the winner's next root key is gone: %v", err)
		}
		if id != j.Next.RootKeyID && !errors.Is(err, keystore.ErrNotFound) {
			t.Fatalf("the losing prepare's root key %s was left behind (err %v)", id, err)
		}
	}
	if err := b.Maintain(context.Background()); err != nil {
		t.Fatal(err)
	}
	rb, err := b.Rotation()
	if err != nil || rb.Phase != ca.PhasePrepared || !rb.Next.Equal(ra.Next) {
		t.Fatalf("loser did not follow the winner: phase %s, err %v", rb.Phase, err)
	}
	if !sameCerts(b.Issuer().Roots, []*x509.Certificate{rb.Current, ra.Next}) {
		t.Fatal("the loser's bundle does not hold the winner's next root")
	}
}

// A replica that has just become leader may not have followed its
// predecessor's last step yet. Its steps are decided on the journal as
// stored, not refused as a conflict or judged against a phase that has
// passed; and what a refused step read is followed at the next pass.
func TestStepsStartFromTheStoredJournal(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	keys := &flakyKeys{Store: memory.New()}
	path := filepath.Join(t.TempDir(), "journal.json")
	before := replica(t, keys, ca.FileJournal{Path: path}, clock, nil)
	after := replica(t, keys, ca.FileJournal{Path: path}, clock, nil)
	rootA := after.Issuer().Roots[0]

	// after has run no pass since the prepare: it still thinks idle.
	prepared := rotate(t, before, ca.StepPrepare)
	r := rotate(t, after, ca.StepActivate)
	if !r.Current.Equal(prepared.Next) || !after.Issuer().Roots[0].Equal(prepared.Next) {
		t.Fatal("the activation did not make the prepared root current")
	}
	if err := verifies(issue(t, after, workload).Chain, []*x509.Certificate{prepared.Next}, clock.Now()); err != nil {
		t.Fatalf("leaf after the activation: %v", err)
	}

	// before still thinks prepared: its activate is refused for the
	// phase the journal is in, and it follows that phase at its next
	// pass although its own read found the change first.
	if _, err := before.Rotate(context.Background(), ca.StepActivate); !errors.Is(err, ca.ErrRotationPhase) {
		t.Fatalf("activate of an activated rotation: err = %v, want ErrRotationPhase", err)
	}
	if !before.Issuer().Roots[0].Equal(rootA) {
		t.Fatal("a refused step changed the issuer")
	}
	if err := before.Maintain(context.Background()); err != nil {
		t.Fatal(err)
	}
	bi := before.Issuer()
	if !sameCerts(bi.Roots, []*x509.Certificate{prepared.Next, rootA}) {
		t.Fatal("after its pass, the replica's bundle is not [new, old]")
	}
	if err := verifies(issue(t, before, workload).Chain, []*x509.Certificate{prepared.Next}, clock.Now()); err != nil {
		t.Fatalf("the replica still signs under the retiring root: %v", err)
	}
}

// racyJournal reports no journal to the first Load, as a replica racing
// another at first start sees, and then refuses its create.
type racyJournal struct {
	ca.FileJournal
	once sync.Once
	lied atomic.Bool
}

func (r *racyJournal) Load(ctx context.Context) ([]byte, string, error) {
	var lie bool
	r.once.Do(func() { lie = true })
	if lie {
		r.lied.Store(true)
		return nil, "", fmt.Errorf("test: %w", fs.ErrNotExist)
	}
	return r.FileJournal.Load(ctx)
}

func TestBootstrapRaceAdoptsTheWinner(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	keys := &flakyKeys{Store: memory.New()}
	path := filepath.Join(t.TempDir(), "journal.json")
	winner := replica(t, keys, ca.FileJournal{Path: path}, clock, nil)
	racy := &racyJournal{FileJournal: ca.FileJournal{Path: path}}
	loser := replica(t, keys, racy, clock, nil)
	if !racy.lied.Load() {
		t.Fatal("the race was not staged")
	}
	if !loser.Issuer().Roots[0].Equal(winner.Issuer().Roots[0]) {
		t.Fatal("the replica that lost the start-up race kept its own root")
	}
	j, err := ca.LoadJournal(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(keys.generated) != 2 {
		t.Fatalf("%d keys generated, want one root per replica", len(keys.generated))
	}
	for _, id := range keys.generated {
		_, err := keys.Store.GetKey(context.Background(), id)
		if id == j.Current.RootKeyID && err != nil {
			t.Fatalf("the winner's root key is gone: %v", err)
		}
		if id != j.Current.RootKeyID && !errors.Is(err, keystore.ErrNotFound) {
			t.Fatalf("the loser's root key %s was not deleted (err %v)", id, err)
		}
	}
}

// With the keystore down, leaves keep coming from the current intermediate;
// renewal is retried with doubling delays, root rotation fails as
// unavailable, and everything recovers once the keystore is back.
func TestKeystoreOutage(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	keys := &flakyKeys{Store: memory.New()}
	reg := prometheus.NewRegistry()
	a := replica(t, keys, ca.FileJournal{Path: filepath.Join(t.TempDir(), "j.json")}, clock, reg)
	old := a.Issuer()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()

	keys.down.Store(true)
	if _, err := a.Rotate(ctx, ca.StepPrepare); !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("prepare with the keystore down: err = %v, want keystore.ErrUnavailable", err)
	}
	if r, _ := a.Rotation(); r.Phase != ca.PhaseIdle {
		t.Fatalf("a failed prepare left phase %s", r.Phase)
	}

	// Past half-life, renewal is due and fails at the next maintenance
	// tick; retries come after 1s, 2s, 4s.
	pass(t, ctx, clock, 12*time.Hour+time.Second)
	for i, want := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second} {
		f := a.Failing()
		if f == nil || f.Attempts != i+1 {
			t.Fatalf("after %d failed passes: %+v", i+1, f)
		}
		if got := f.NextRetry.Sub(clock.Now()); got != want {
			t.Fatalf("retry %d after %s, want %s", i+1, got, want)
		}
		pass(t, ctx, clock, want)
	}
	if got := testenv.GatheredValue(t, reg, "meshca_ca_maintenance_failing", nil); got != 1 {
		t.Fatalf("meshca_ca_maintenance_failing = %v, want 1", got)
	}
	if !a.Issuer().Cert.Equal(old.Cert) {
		t.Fatal("the issuer changed while the keystore was down")
	}
	if err := verifies(issue(t, a, workload).Chain, old.Roots, clock.Now()); err != nil {
		t.Fatalf("issuance during the outage: %v", err)
	}

	keys.down.Store(false)
	pass(t, ctx, clock, a.Failing().NextRetry.Sub(clock.Now()))
	if f := a.Failing(); f != nil || a.Issuer().Cert.Equal(old.Cert) {
		t.Fatalf("maintenance did not recover after the keystore came back: %+v", f)
	}
	if got := testenv.GatheredValue(t, reg, "meshca_ca_maintenance_failing", nil); got != 0 {
		t.Fatalf("meshca_ca_maintenance_failing = %v after recovery, want 0", got)
	}
	rotate(t, a, ca.StepPrepare)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// pass advances clock by d once Run waits on its maintenance timer, and
// returns when Run has finished the pass that fired and re-armed the timer.
func pass(t *testing.T, ctx context.Context, clock *clockwork.FakeClock, d time.Duration) {
	t.Helper()
	if err := clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	clock.Advance(d)
	if err := clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
}

func TestFileJournalCompareAndSwap(t *testing.T) {
	ctx := context.Background()
	j := ca.FileJournal{Path: filepath.Join(t.TempDir(), "j.json")}
	if _, _, err := j.Load(ctx); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load of a missing journal: %v", err)
	}
	rev1, err := j.Save(ctx, []byte("one"), "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := j.Save(ctx, []byte("two"), ""); !errors.Is(err, ca.ErrJournalConflict) {
		t.Fatalf("create over an existing journal: err = %v, want conflict", err)
	}
	if _, err := j.Save(ctx, []byte("two"), rev1); err != nil {
		t.Fatal(err)
	}
	if _, err := j.Save(ctx, []byte("three"), rev1); !errors.Is(err, ca.ErrJournalConflict) {
		t.Fatalf("save from a stale revision: err = %v, want conflict", err)
	}
	data, _, err := j.Load(ctx)
	if err != nil || string(data) != "two" {
		t.Fatalf("journal = %q, %v; want the last accepted write", data, err)
	}
	if fi, err := os.Stat(j.Path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("journal mode %v (%v), want 0600", fi.Mode(), err)
	}
}

// An activation the keystore cannot sign for (the prepared root's key is
// out of reach) records nothing: the phase stays prepared, on disk too.
func TestActivateWithKeystoreDownChangesNothing(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	keys := &flakyKeys{Store: memory.New()}
	path := filepath.Join(t.TempDir(), "j.json")
	a := replica(t, keys, ca.FileJournal{Path: path}, clock, nil)
	rotate(t, a, ca.StepPrepare)
	keys.down.Store(true)
	if _, err := a.Rotate(context.Background(), ca.StepActivate); !errors.Is(err, keystore.ErrUnavailable) {
		t.Fatalf("activate with the keystore down: err = %v, want keystore.ErrUnavailable", err)
	}
	if r, _ := a.Rotation(); r.Phase != ca.PhasePrepared {
		t.Fatalf("phase in memory after a failed activate: %s", r.Phase)
	}
	if j, err := ca.LoadJournal(path); err != nil || j.Next == nil || len(j.Retiring) != 0 {
		t.Fatalf("journal after a failed activate: %+v, %v; want still prepared", j, err)
	}
	keys.down.Store(false)
	if r := rotate(t, a, ca.StepActivate); r.Phase != ca.PhaseActivated || !a.Issuer().Roots[0].Equal(r.Current) {
		t.Fatalf("activate once the keystore is back: phase %s", r.Phase)
	}
}
