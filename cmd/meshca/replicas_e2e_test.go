package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/tools/leaderelection"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/internal/kubestate"
	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/internal/testenv"
)

// Lease timings of the replicas: short, so the test waits seconds, not the
// production 15s.
const (
	replicaLease = 5 * time.Second
	replicaRenew = 3 * time.Second
	replicaRetry = 500 * time.Millisecond
	// replicaSlack covers what the lease protocol does not bound between
	// the last renewal and the takeover, both read from the Lease's own
	// records: the survivor's API round trips on 2 loaded cores under the
	// race detector. The bound stays well under the 15s default lease, so
	// lease timings that did not reach the election still fail it.
	replicaSlack = 3 * time.Second
	// afterTakeover is how many certificates the survivor must issue after
	// it took over before the issuance loops stop.
	afterTakeover = 50
)

const leaseName = "meshca-leader"

// serverReplica is a `meshca server` child process, one of several
// sharing a CA, that the test can SIGKILL and start again with the same
// arguments.
type serverReplica struct {
	name                          string
	args                          []string
	grpc, monitor, socket, bundle string

	cmd  *exec.Cmd
	done chan struct{} // closed once the process has exited
	runs int
}

func newServerReplica(t *testing.T, name string, shared []string) *serverReplica {
	t.Helper()
	dir := t.TempDir()
	r := &serverReplica{
		name: name, grpc: freeAddr(t), monitor: freeAddr(t),
		socket: filepath.Join(dir, "admin.sock"), bundle: filepath.Join(dir, "bundle.pem"),
	}
	r.args = append([]string{"server", "--data-dir", dir, "--grpc-addr", r.grpc, "--monitor-addr", r.monitor,
		"--admin-socket", r.socket, "--bundle-out", r.bundle}, shared...)
	return r
}

// start runs the replica and waits until /readyz says it serves.
func (r *serverReplica) start(t *testing.T) {
	t.Helper()
	r.runs++
	run := r.runs
	logs := &syncBuffer{}
	cmd := meshcaChild(context.Background(), r.args...)
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var exitErr error
	go func() {
		exitErr = cmd.Wait()
		close(done)
	}()
	r.cmd, r.done = cmd, done
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("replica %s (run %d) log, last lines:\n%s", r.name, run, lastLines(logs.String(), 150))
		}
	})
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if resp, err := http.Get("http://" + r.monitor + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case <-done:
			t.Fatalf("replica %s exited: %v\n%s", r.name, exitErr, logs.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica %s not ready after 2 minutes:\n%s", r.name, logs.String())
		}
	}
}

// kill stops the replica with SIGKILL: it runs no shutdown code, so it
// neither releases the Lease nor finishes what it was doing.
func (r *serverReplica) kill(t *testing.T) {
	t.Helper()
	if err := r.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-r.done
}

// leading scrapes the replica's meshca_leader gauge.
func (r *serverReplica) leading() (float64, error) {
	resp, err := http.Get("http://" + r.monitor + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, "meshca_leader "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, fmt.Errorf("replica %s exposes no meshca_leader", r.name)
}

// status is the replica's root rotation status, which names the leader it
// knows of (itself while it leads).
func (r *serverReplica) status() (rotation.Status, error) {
	var st rotation.Status
	err := admin.NewUnixClient(r.socket).Do(context.Background(), http.MethodGet, "/v1/roots", nil, &st)
	return st, err
}

func (r *serverReplica) client(t *testing.T, bundle []*x509.Certificate) *caclient.Client {
	t.Helper()
	c, err := caclient.New(caclient.Config{Address: r.grpc, TrustBundle: bundle, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// issueLoop asks one replica for certificates as fast as its workers can,
// recording when each attempt started and ended and whether it failed.
type issueLoop struct {
	mu       sync.Mutex
	attempts []issueAttempt
	firstErr error
	stop     context.CancelFunc
	wg       sync.WaitGroup
}

type issueAttempt struct {
	start, end time.Time
	ok         bool
}

func startIssuing(c *caclient.Client, token string, workers int) *issueLoop {
	ctx, cancel := context.WithCancel(context.Background())
	l := &issueLoop{stop: cancel}
	for range workers {
		l.wg.Go(func() {
			for ctx.Err() == nil {
				start := time.Now()
				_, err := c.Fetch(ctx, caclient.Request{Token: token})
				if ctx.Err() != nil {
					return // stopped mid-call: not the server's doing
				}
				l.record(issueAttempt{start: start, end: time.Now(), ok: err == nil}, err)
				if err != nil {
					// A client backs off from a dead server
					// rather than spin on refused connections.
					time.Sleep(100 * time.Millisecond)
				}
			}
		})
	}
	return l
}

func (l *issueLoop) record(a issueAttempt, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.attempts = append(l.attempts, a)
	if err != nil && l.firstErr == nil {
		l.firstErr = err
	}
}

func (l *issueLoop) halt() {
	l.stop()
	l.wg.Wait()
}

// count counts the attempts that succeeded (ok) or failed (!ok) and
// satisfy when.
func (l *issueLoop) count(ok bool, when func(issueAttempt) bool) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, a := range l.attempts {
		if a.ok == ok && when(a) {
			n++
		}
	}
	return n
}

// Selectors for count.
func attemptAny(issueAttempt) bool { return true }
func attemptEndedBefore(t time.Time) func(issueAttempt) bool {
	return func(a issueAttempt) bool { return a.end.Before(t) }
}
func attemptStartedAfter(t time.Time) func(issueAttempt) bool {
	return func(a issueAttempt) bool { return a.start.After(t) }
}
func attemptWithin(from, to time.Time) func(issueAttempt) bool {
	return func(a issueAttempt) bool { return a.start.After(from) && a.end.Before(to) }
}

// leaseRecord is one version of the Lease, as a watch saw it.
type leaseRecord struct {
	holder         string
	acquire, renew time.Time
}

// watchLease records every version of the Lease from now until ctx ends.
func watchLease(ctx context.Context, t *testing.T, env *testenv.Kube) func() []leaseRecord {
	t.Helper()
	leases := env.Clientset().CoordinationV1().Leases("meshca-system")
	cur, err := leases.Get(ctx, leaseName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w, err := leases.Watch(ctx, metav1.ListOptions{
		FieldSelector:   fields.OneTermEqualSelector("metadata.name", leaseName).String(),
		ResourceVersion: cur.ResourceVersion,
	})
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu   sync.Mutex
		seen = []leaseRecord{recordOf(cur)}
		done = make(chan struct{})
	)
	go func() {
		defer close(done)
		for ev := range w.ResultChan() {
			if l, ok := ev.Object.(*coordinationv1.Lease); ok {
				mu.Lock()
				seen = append(seen, recordOf(l))
				mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { w.Stop(); <-done })
	return func() []leaseRecord {
		mu.Lock()
		defer mu.Unlock()
		return append([]leaseRecord(nil), seen...)
	}
}

func recordOf(l *coordinationv1.Lease) leaseRecord {
	var r leaseRecord
	if l.Spec.HolderIdentity != nil {
		r.holder = *l.Spec.HolderIdentity
	}
	if l.Spec.AcquireTime != nil {
		r.acquire = l.Spec.AcquireTime.Time
	}
	if l.Spec.RenewTime != nil {
		r.renew = l.Spec.RenewTime.Time
	}
	return r
}

func leaseHolder(ctx context.Context, env *testenv.Kube) (string, *coordinationv1.Lease, error) {
	l, err := env.Clientset().CoordinationV1().Leases("meshca-system").Get(ctx, leaseName, metav1.GetOptions{})
	if err != nil {
		return "", nil, err
	}
	if l.Spec.HolderIdentity == nil {
		return "", l, nil
	}
	return *l.Spec.HolderIdentity, l, nil
}

// bundleHolds checks that the --bundle-out file at path holds the roots
// with fingerprints fps, in that order, and no other.
func bundleHolds(path string, fps ...string) error {
	certs, err := caclient.LoadBundle(path)
	if err != nil {
		return err
	}
	var got []string
	for _, c := range certs {
		got = append(got, ca.Fingerprint(c))
	}
	if !slices.Equal(got, fps) {
		return fmt.Errorf("%s holds roots %v, want %v", path, got, fps)
	}
	return nil
}

// chainsTo checks that creds verify against root alone and returns their
// intermediate.
func chainsTo(creds *caclient.Credentials, root *x509.Certificate) (*x509.Certificate, error) {
	if len(creds.Chain) != 2 {
		return nil, fmt.Errorf("chain of %d certificates, want leaf and intermediate", len(creds.Chain))
	}
	bundle := x509bundle.FromX509Authorities(creds.ID.TrustDomain(), []*x509.Certificate{root})
	if _, _, err := x509svid.Verify(creds.Chain, bundle); err != nil {
		return nil, fmt.Errorf("does not chain to root %s: %w", shortFP(ca.Fingerprint(root)), err)
	}
	return creds.Chain[1], nil
}

// TestReplicasHandOverLeadership runs two `meshca server` processes that
// share a CA (roots in a shared disk keystore, the journal in a Secret, an
// intermediate each) and elect a leader with a Lease on a real API server.
// The leader is killed with SIGKILL under load: the survivor takes the
// Lease, not before the lease timings allow, issues throughout without
// one failure, and, now leading, can take a rotation step it refused as a
// follower; the killed replica, started again, follows the new leader and
// the journal it wrote.
func TestReplicasHandOverLeadership(t *testing.T) {
	env := testenv.StartKube(t)
	env.CreateNamespace(t, "meshca-system")
	env.CreateServiceAccount(t, "shop", "cart")
	token := env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, nil)
	ctx := t.Context()

	shared := []string{"--namespace", "meshca-system", "--kubeconfig", env.Kubeconfig(),
		"--keystore", "disk", "--keystore-dir", filepath.Join(t.TempDir(), "keys"),
		"--keystore-passphrase-file", writeFile(t, "pass", []byte("correct horse battery staple")),
		"--intermediates", "per-replica", "--ca-journal", "secret", "--ca-maintain-interval", "1s",
		"--leader-election", "lease", "--leader-lease", leaseName,
		"--leader-lease-duration", replicaLease.String(), "--leader-renew-deadline", replicaRenew.String(),
		"--leader-retry-period", replicaRetry.String()}

	// Timings the election cannot keep stop start-up, naming the flags.
	bad := append(append([]string{"--data-dir", t.TempDir()}, shared...),
		"--keystore-dir", filepath.Join(t.TempDir(), "keys"), "--leader-renew-deadline", "4s")
	if err := serverError(t, bad...); !strings.Contains(err.Error(), "--leader-renew-deadline (4s), --leader-retry-period (500ms): leader: lease duration 5s must be longer than 5.5s") {
		t.Fatalf("lease 5s, renew deadline 4s, retry period 500ms: %v", err)
	}

	// One after the other: the first creates the keystore and the root,
	// the second finds both.
	a, b := newServerReplica(t, "a", shared), newServerReplica(t, "b", shared)
	a.start(t)
	b.start(t)
	replicas := []*serverReplica{a, b}

	// Exactly one leads, and everyone agrees which: the Lease, both
	// replicas' meshca_leader and the leader each one names.
	var lead, follow *serverReplica
	var leaderID string
	testenv.Eventually(t, "one leader that all agree on", func() error {
		holder, lease, err := leaseHolder(ctx, env)
		if err != nil {
			return err
		}
		if got := lease.Spec.LeaseDurationSeconds; got == nil || time.Duration(*got)*time.Second != replicaLease {
			t.Fatalf("the Lease's duration is %v s, want %v from --leader-lease-duration", got, replicaLease)
		}
		lead, follow = nil, nil
		for _, r := range replicas {
			g, err := r.leading()
			if err != nil {
				return err
			}
			st, err := r.status()
			if err != nil {
				return err
			}
			if st.Leader != holder || holder == "" {
				return fmt.Errorf("replica %s names %q as leader, the Lease %q", r.name, st.Leader, holder)
			}
			switch {
			case g == 1 && lead == nil:
				lead = r
			case g == 1:
				t.Fatalf("replicas %s and %s both lead", lead.name, r.name)
			default:
				follow = r
			}
		}
		if lead == nil || follow == nil {
			return errors.New("no leader yet")
		}
		leaderID = holder
		return nil
	})
	t.Logf("replica %s leads as %s; %s follows", lead.name, leaderID, follow.name)

	// Both issue, each through its own intermediate under the one root.
	roots, err := caclient.LoadBundle(a.bundle)
	if err != nil || len(roots) != 1 {
		t.Fatalf("replica a's trust bundle: %d roots, %v", len(roots), err)
	}
	oldRoot := roots[0]
	if bb, err := caclient.LoadBundle(b.bundle); err != nil || len(bb) != 1 || !bb[0].Equal(oldRoot) {
		t.Fatalf("replica b's trust bundle differs from a's: %v", err)
	}
	intermediates := map[*serverReplica]*x509.Certificate{}
	for _, r := range replicas {
		creds, err := r.client(t, roots).Fetch(ctx, caclient.Request{Token: token})
		if err != nil {
			t.Fatalf("replica %s: %v", r.name, err)
		}
		if creds.ID.String() != "spiffe://cluster.local/ns/shop/sa/cart" {
			t.Fatalf("replica %s issued to %s", r.name, creds.ID)
		}
		interm, err := chainsTo(creds, oldRoot)
		if err != nil {
			t.Fatalf("replica %s: %v", r.name, err)
		}
		st, err := r.status()
		if err != nil {
			t.Fatal(err)
		}
		if got := st.Roots[0].SignsIntermediateOf; got != ca.Fingerprint(interm) {
			t.Fatalf("replica %s issued through %s but reports its intermediate as %s", r.name, ca.Fingerprint(interm), got)
		}
		intermediates[r] = interm
	}
	if intermediates[a].Equal(intermediates[b]) {
		t.Fatal("both replicas issue through the same intermediate")
	}

	// A follower refuses a rotation step, naming the leader.
	_, _, err = meshcaRun("root", "prepare", "--admin-socket", follow.socket)
	var apiErr *admin.APIError
	if !errors.As(err, &apiErr) || apiErr.HTTPStatus != http.StatusConflict || !strings.Contains(apiErr.Body.Error, leaderID+" leads") {
		t.Fatalf("root prepare on the follower: %v, want 409 naming %s", err, leaderID)
	}

	// Issue from both as fast as they go, then kill the leader.
	leases := watchLease(ctx, t, env)
	onFollower := startIssuing(follow.client(t, roots), token, 2)
	onLeader := startIssuing(lead.client(t, roots), token, 2)
	defer onFollower.halt()
	defer onLeader.halt()
	testenv.Eventually(t, "both replicas issuing", func() error {
		if n := onFollower.count(true, attemptAny); n < afterTakeover {
			return fmt.Errorf("follower issued %d", n)
		}
		if n := onLeader.count(true, attemptAny); n < afterTakeover {
			return fmt.Errorf("leader issued %d", n)
		}
		return nil
	})
	killedAt := time.Now()
	lead.kill(t)
	deadAt := time.Now()

	// The survivor takes over: the Lease names someone new, which can
	// only be the survivor, and the survivor says it leads.
	var survivorID string
	testenv.Eventually(t, "a takeover after the kill", func() error {
		holder, _, err := leaseHolder(ctx, env)
		if err != nil {
			return err
		}
		if holder == leaderID || holder == "" {
			return fmt.Errorf("the Lease names %q", holder)
		}
		if g, err := follow.leading(); err != nil || g != 1 {
			return fmt.Errorf("the Lease names %q, the survivor's meshca_leader is %v (%v)", holder, g, err)
		}
		survivorID = holder
		return nil
	})
	tookOverAt := time.Now()
	handover := tookOverAt.Sub(killedAt)

	// Requests begun after the takeover, so served by the new leader.
	testenv.Eventually(t, fmt.Sprintf("%d certificates from the survivor after the takeover", afterTakeover), func() error {
		if n := onFollower.count(true, attemptStartedAfter(tookOverAt)); n < afterTakeover {
			return fmt.Errorf("%d so far", n)
		}
		return nil
	})
	onFollower.halt()
	onLeader.halt()

	// The survivor never failed a request, before, during or after.
	fBefore := onFollower.count(true, attemptEndedBefore(killedAt))
	fAfterKill := onFollower.count(true, attemptStartedAfter(killedAt))
	fAfterTakeover := onFollower.count(true, attemptStartedAfter(tookOverAt))
	fFailed := onFollower.count(false, attemptAny)
	lBefore := onLeader.count(true, attemptEndedBefore(killedAt))
	lFailedBefore := onLeader.count(false, attemptEndedBefore(killedAt))
	lFailedAfter := onLeader.count(false, attemptStartedAfter(killedAt))
	// A response sent before the kill may be read after it; one to a
	// request sent once the process was gone cannot exist.
	lAfterDeath := onLeader.count(true, attemptStartedAfter(deadAt))
	t.Logf("hand-over: the survivor led %v after the SIGKILL (lease %v, renew deadline %v, retry period %v)",
		handover.Round(time.Millisecond), replicaLease, replicaRenew, replicaRetry)
	t.Logf("survivor (follower, then leader): %d issued before the kill, %d for requests sent after it, %d of them after the takeover; %d failed",
		fBefore, fAfterKill, fAfterTakeover, fFailed)
	t.Logf("killed leader: %d issued before the kill; %d failed before the kill, %d after (expected: it is dead)",
		lBefore, lFailedBefore, lFailedAfter)
	if fFailed > 0 {
		t.Errorf("the surviving replica failed %d requests; first: %v", fFailed, onFollower.firstErr)
	}
	if lFailedBefore > 0 {
		t.Errorf("the leader failed %d requests before it was killed; first: %v", lFailedBefore, onLeader.firstErr)
	}
	if lAfterDeath > 0 {
		t.Errorf("%d certificates came from the killed leader for requests sent after it died", lAfterDeath)
	}
	if lFailedAfter == 0 {
		t.Error("no request to the killed leader failed: the loop against it did not run on")
	}

	// The lease protocol's safety bound. A killed holder never releases
	// the Lease, so the survivor waits out a whole lease from the last
	// renewal it saw (sooner, two replicas could lead at once). It may
	// have seen that renewal up to a second early: client-go tells Lease
	// records apart by their times in whole seconds, and renewals here
	// come less than a second apart (see leader.CheckTimings). So the new
	// term starts a lease after the second of the last renewal, at the
	// earliest. At the latest, the issue's requirement: the survivor sees
	// the renewal within one of its tries, which client-go spaces by the
	// retry period stretched by up to JitterFactor, and takes the Lease at
	// its first try after the lease has run out, so two such tries beyond
	// the lease (plus replicaSlack). Both ends are read from the Lease
	// records, not from the test's polling; the time from the kill to the
	// test seeing the takeover is only logged.
	var lastRenew, acquired time.Time
	seen := leases()
	for i, rec := range seen {
		if rec.holder == survivorID {
			if i == 0 || seen[i-1].holder != leaderID {
				t.Fatalf("the Lease went to %s from %q, not from the killed leader %s: %+v", survivorID, seen[max(0, i-1)].holder, leaderID, seen)
			}
			lastRenew, acquired = seen[i-1].renew, rec.acquire
			break
		}
	}
	if acquired.IsZero() {
		t.Fatalf("the watch saw no takeover: %+v", seen)
	}
	gap := acquired.Sub(lastRenew)
	maxGap := replicaLease + 2*time.Duration((1+leaderelection.JitterFactor)*float64(replicaRetry)) + replicaSlack
	t.Logf("the Lease: last renewed by the killed leader %v before the kill, taken by the survivor %v after that renewal (lease %v, bound %v)",
		killedAt.Sub(lastRenew).Round(time.Millisecond), gap.Round(time.Millisecond), replicaLease, maxGap)
	if earliest := lastRenew.Truncate(time.Second).Add(replicaLease); acquired.Before(earliest) {
		t.Errorf("the survivor took the Lease %v after the last renewal, before a lease of %v from its second had run out", gap, replicaLease)
	}
	if gap > maxGap {
		t.Errorf("the survivor took the Lease %v after the last renewal; the lease timings bound it by %v", gap, maxGap)
	}
	// Issuance needs no leader: it went on while none led.
	leaderless := onFollower.count(true, attemptWithin(deadAt, acquired))
	t.Logf("the survivor issued %d certificates while no replica led", leaderless)
	if leaderless == 0 {
		t.Error("the survivor issued nothing between the kill and its takeover")
	}

	// Now leading, the survivor takes the step it refused as a follower.
	st, err := follow.status()
	if err != nil {
		t.Fatal(err)
	}
	if st.Leader != survivorID {
		t.Fatalf("the survivor names %q as leader, the Lease %q", st.Leader, survivorID)
	}
	var prepared rotation.Status
	if err := json.Unmarshal([]byte(meshcaCmd(t, "root", "prepare", "--admin-socket", follow.socket, "--json")), &prepared); err != nil {
		t.Fatal(err)
	}
	slots := rootsOf(prepared)
	if prepared.Phase != ca.PhasePrepared || slots[rotation.SlotCurrent] != ca.Fingerprint(oldRoot) || slots[rotation.SlotNext] == "" {
		t.Fatalf("after prepare on the survivor: %+v", prepared)
	}
	nextFP := slots[rotation.SlotNext]

	// The journal in the Secret is one this meshca reads, and says so too.
	secret, err := env.Clientset().CoreV1().Secrets("meshca-system").Get(ctx, kubestate.DefaultName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	j, err := ca.LoadJournal(writeFile(t, "journal.json", secret.Data[kubestate.DefaultKey]))
	if err != nil {
		t.Fatal(err)
	}
	if j.Next == nil || j.PreparedAt == nil {
		t.Fatalf("the journal has no prepared root: %s", secret.Data[kubestate.DefaultKey])
	}
	for slot, want := range map[*ca.Slot]string{j.Current: ca.Fingerprint(oldRoot), j.Next: nextFP} {
		certs, err := ca.ParseCerts([]byte(slot.RootCertPEM))
		if err != nil || len(certs) != 1 || ca.Fingerprint(certs[0]) != want {
			t.Fatalf("journal slot with root key %s: %v, want root %s", slot.RootKeyID, err, shortFP(want))
		}
	}
	if j.Current.IntermediateCertPEM != "" {
		t.Error("a per-replica intermediate was written to the journal")
	}
	testenv.Eventually(t, "the survivor's trust bundle holds both roots", func() error {
		return bundleHolds(follow.bundle, ca.Fingerprint(oldRoot), nextFP)
	})

	// The killed replica, started again, follows the new leader and the
	// journal it wrote.
	lead.start(t)
	testenv.Eventually(t, "the restarted replica follows "+survivorID, func() error {
		holder, _, err := leaseHolder(ctx, env)
		if err != nil {
			return err
		}
		if holder != survivorID {
			t.Fatalf("the Lease moved to %q after the restart", holder)
		}
		if g, err := follow.leading(); err != nil || g != 1 {
			t.Fatalf("the survivor's meshca_leader is %v (%v) after the restart", g, err)
		}
		g, err := lead.leading()
		if err != nil {
			return err
		}
		st, err := lead.status()
		if err != nil {
			return err
		}
		if g != 0 || st.Leader != survivorID {
			return fmt.Errorf("restarted replica: meshca_leader %v, names %q as leader", g, st.Leader)
		}
		return nil
	})
	testenv.Eventually(t, "the restarted replica's trust bundle holds both roots", func() error {
		return bundleHolds(lead.bundle, ca.Fingerprint(oldRoot), nextFP)
	})
	_, _, err = meshcaRun("root", "activate", "--admin-socket", lead.socket)
	if !errors.As(err, &apiErr) || apiErr.HTTPStatus != http.StatusConflict || !strings.Contains(apiErr.Body.Error, survivorID+" leads") {
		t.Fatalf("root activate on the restarted replica: %v, want 409 naming %s", err, survivorID)
	}
	creds, err := lead.client(t, roots).Fetch(ctx, caclient.Request{Token: token})
	if err != nil {
		t.Fatalf("the restarted replica: %v", err)
	}
	interm, err := chainsTo(creds, oldRoot)
	if err != nil {
		t.Fatalf("the restarted replica: %v", err)
	}
	if interm.Equal(intermediates[lead]) || interm.Equal(intermediates[follow]) {
		t.Error("the restarted replica issues through an intermediate it had before, or the survivor's")
	}
}
