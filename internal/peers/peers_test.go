package peers_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jonboulle/clockwork"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/meshca/meshca/internal/peers"
	"github.com/meshca/meshca/internal/rotation/rotationtest"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/sds"
)

const rootA, rootB = "aaaa", "bbbb"

// TestViewMergesReplicas: another replica's streams count while its entry
// is fresh, its certificates until each expires, fresh or stale; once
// stale with nothing live, the entry is removed from the ConfigMap.
func TestViewMergesReplicas(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	client := casClient()
	a := newReplica(t, client, clock, "meshca-a", nil)
	b := newReplica(t, client, clock, "meshca-b", nil)
	a.proxies.Set(stream("web", rootA, rootB))
	a.ledger.Add(holding("web", rootA, start.Add(time.Hour)))
	nack := stream("db", rootA)
	nack.RejectedRoots, nack.LastNACK = []string{rootA, rootB}, "bad bundle"
	cache := stream("cache", rootA)
	cache.Subscribed = []string{sds.CertName} // not watching ROOTCA: not the gate's business
	b.proxies.Set(nack, cache)
	b.ledger.Add(holding("db", rootA, start.Add(10*time.Minute)))
	b.ledger.Add(holding("gone", rootA, start.Add(time.Hour)))

	b.run(t)
	a.run(t) // its first read sees b's entry

	streams := a.view.Status()
	if got, want := identities(streams), []string{id("web").String(), id("db").String()}; !slices.Equal(got, want) {
		t.Fatalf("a's merged streams = %v, want %v (b's ROOTCA stream only)", got, want)
	}
	db := streams[1]
	if db.Peer.Node != "db-node" || !db.Since.Equal(start) || !slices.Equal(db.AckedRoots, []string{rootA}) ||
		!slices.Equal(db.RejectedRoots, []string{rootA, rootB}) || db.LastNACK != "bad bundle" || !slices.Equal(db.Subscribed, []string{sds.RootsName}) {
		t.Errorf("b's stream as a sees it: %+v", db)
	}
	assertHoldings(t, a.view, clock.Now(), "web", "db", "gone")

	// b stops writing: its stream no longer counts once its entry is
	// stale; its certificates do until each expires.
	b.stop()
	tick(t, clock, 16*time.Second, a)
	if got := identities(a.view.Status()); !slices.Equal(got, []string{id("web").String()}) {
		t.Errorf("with b stale, a's merged streams = %v, want a's own only", got)
	}
	assertHoldings(t, a.view, clock.Now(), "web", "db", "gone")
	tick(t, clock, 10*time.Minute, a)
	assertHoldings(t, a.view, clock.Now(), "web", "gone")
	if _, ok := getConfigMap(t, client).BinaryData["meshca-b"]; !ok {
		t.Fatal("b's stale entry was removed while it still listed a live certificate")
	}
	if got := testenv.GatheredValue(t, a.reg, "meshca_peers_replicas", map[string]string{"state": "stale"}); got != 1 {
		t.Errorf("meshca_peers_replicas{state=stale} = %v, want 1", got)
	}

	// Past the last of b's certificates, a removes b's entry.
	tick(t, clock, time.Hour, a)
	assertHoldings(t, a.view, clock.Now())
	cm := getConfigMap(t, client)
	if _, ok := cm.BinaryData["meshca-b"]; ok {
		t.Error("b's entry is still there although it is stale and nothing it listed is live")
	}
	if _, ok := cm.BinaryData["meshca-a"]; !ok {
		t.Error("a's own entry is gone")
	}
}

// assertHoldings checks the SPIFFE IDs (by service account) of the
// certificates v says are valid at at.
func assertHoldings(t *testing.T, v *peers.View, at time.Time, sas ...string) {
	t.Helper()
	hs, err := v.Valid(context.Background(), at)
	if err != nil {
		t.Fatalf("Valid: %v", err)
	}
	var got, want []string
	for _, h := range hs {
		got = append(got, h.SPIFFEID)
	}
	for _, sa := range sas {
		want = append(want, id(sa).String())
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("Valid(%s) = %v, want %v", at.Format(time.TimeOnly), got, want)
	}
}

// sneakIn makes the next n updates of the ConfigMap find it changed
// under them, as if another replica had written in between, each time
// adding key i to it. The reactor must run before casClient's.
func sneakIn(client *fake.Clientset, n int) {
	done := 0
	client.PrependReactor("update", "configmaps", func(k8stesting.Action) (bool, runtime.Object, error) {
		if done == n {
			return false, nil, nil
		}
		done++
		obj, err := client.Tracker().Get(configMapsResource, ns, peers.DefaultName)
		if err != nil {
			return true, nil, err
		}
		cm := obj.(*corev1.ConfigMap)
		cm.BinaryData[fmt.Sprintf("meshca-sneaked-%d", done)] = []byte("an entry")
		cm.ResourceVersion += "0"
		if err := client.Tracker().Update(configMapsResource, cm, ns); err != nil {
			return true, nil, err
		}
		return false, nil, nil
	})
}

// TestConflictKeepsBothWriters: when another replica writes between this
// one's read and its update, the update conflicts, and the retry keeps the
// other's key as well as writing its own. The first retry follows at once;
// later ones after a random pause, which breaks writers out of step.
func TestConflictKeepsBothWriters(t *testing.T) {
	for _, conflicts := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d conflicts", conflicts), func(t *testing.T) {
			clock := clockwork.NewFakeClockAt(start)
			client := casClient()
			b := newReplica(t, client, clock, "meshca-b", nil)
			b.run(t)
			b.stop()

			sneakIn(client, conflicts)
			a := newReplica(t, client, clock, "meshca-a", nil)
			a.start(t)
			if conflicts > 1 {
				if err := clock.BlockUntilContext(t.Context(), 2); err != nil { // a's ticker and pause
					t.Fatal(err)
				}
				clock.Advance(peers.DefaultInterval / 4)
			}
			a.waitTurns(t, 0)

			cm := getConfigMap(t, client)
			want := []string{"meshca-a", "meshca-b"}
			for i := range conflicts {
				want = append(want, fmt.Sprintf("meshca-sneaked-%d", i+1))
			}
			if got := slices.Sorted(maps.Keys(cm.BinaryData)); !slices.Equal(got, want) {
				t.Errorf("keys after a's write: %v, want %v", got, want)
			}
			if got := testenv.GatheredValue(t, a.reg, "meshca_peers_writes_total", map[string]string{"result": "conflict"}); got != float64(conflicts) {
				t.Errorf("conflicts = %v, want %d", got, conflicts)
			}
			if got := testenv.GatheredValue(t, a.reg, "meshca_peers_writes_total", map[string]string{"result": "written"}); got != 1 {
				t.Errorf("writes = %v, want 1", got)
			}
			// What sneaked in is no entry a can read: its gates stay
			// closed, naming it.
			_, err := a.view.Valid(context.Background(), clock.Now())
			if err == nil || !strings.Contains(err.Error(), `replica "meshca-sneaked-1"`) {
				t.Errorf("Valid with an unreadable entry: %v, want an error naming meshca-sneaked-1", err)
			}
		})
	}
}

// TestFailsClosedWhenTheConfigMapCannotBeRead: before the first read and
// while reads fail, Valid fails naming the ConfigMap and the cause, and
// AckChanged fires at each change of that; the next good read restores it.
func TestFailsClosedWhenTheConfigMapCannotBeRead(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	client := casClient()
	var failing atomic.Bool
	client.PrependReactor("get", "configmaps", func(k8stesting.Action) (bool, runtime.Object, error) {
		if failing.Load() {
			return true, nil, apierrors.NewServiceUnavailable("etcd is gone")
		}
		return false, nil, nil
	})
	a := newReplica(t, client, clock, "meshca-a", nil)
	if _, err := a.view.Valid(context.Background(), start); err == nil || !strings.Contains(err.Error(), "has not been read yet") {
		t.Fatalf("Valid before Run: %v, want not read yet", err)
	}
	a.run(t)
	assertHoldings(t, a.view, clock.Now())

	failing.Store(true)
	changed := a.view.AckChanged()
	tick(t, clock, peers.DefaultInterval, a)
	_, err := a.view.Valid(context.Background(), clock.Now())
	if err == nil || !strings.Contains(err.Error(), "ConfigMap meshca-system/meshca-replicas") || !strings.Contains(err.Error(), "etcd is gone") {
		t.Fatalf("Valid while the ConfigMap cannot be read: %v, want an error naming it and the cause", err)
	}
	if !apierrors.IsServiceUnavailable(err) {
		t.Errorf("the API server's error is not in the chain: %v", err)
	}
	if !closed(changed) {
		t.Error("AckChanged did not fire when the view became unreadable")
	}
	if got := testenv.GatheredValue(t, a.reg, "meshca_peers_read_failing", nil); got != 1 {
		t.Errorf("meshca_peers_read_failing = %v, want 1", got)
	}

	failing.Store(false)
	changed = a.view.AckChanged()
	tick(t, clock, peers.DefaultInterval, a)
	assertHoldings(t, a.view, clock.Now())
	if !closed(changed) {
		t.Error("AckChanged did not fire when the view became readable again")
	}
}

// TestFailsClosedWhenNotReadForLong: a view whose publisher stopped
// reading does not pass for current.
func TestFailsClosedWhenNotReadForLong(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	a := newReplica(t, casClient(), clock, "meshca-a", nil)
	a.run(t)
	a.stop()
	clock.Advance(15 * time.Second)
	assertHoldings(t, a.view, clock.Now())
	clock.Advance(time.Second)
	if _, err := a.view.Valid(context.Background(), clock.Now()); err == nil || !strings.Contains(err.Error(), "was last read 16s ago") {
		t.Fatalf("Valid 16s after the last read: %v, want it refused", err)
	}
}

// TestAckChangedFiresOnPeerChange: a change of another replica's ACKs
// reaches this replica's AckChanged once it reads the entry; a rewrite
// with nothing changed but its time does not.
func TestAckChangedFiresOnPeerChange(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	client := casClient()
	a := newReplica(t, client, clock, "meshca-a", nil)
	b := newReplica(t, client, clock, "meshca-b", nil)
	b.proxies.Set(stream("db", rootA))
	b.run(t)
	a.run(t)

	changed := a.view.AckChanged()
	tick(t, clock, peers.DefaultInterval, a, b) // b rewrites, a reads
	tick(t, clock, peers.DefaultInterval, a, b) // a has surely read b's rewrite
	if closed(changed) {
		t.Fatal("AckChanged fired although only b's entry's time changed")
	}

	// b's proxy ACKs the new root: b writes a Debounce later.
	before := b.turns(t)
	b.proxies.Set(stream("db", rootA, rootB))
	if err := clock.BlockUntilContext(t.Context(), 3); err != nil { // two tickers and b's debounce
		t.Fatal(err)
	}
	clock.Advance(peers.DefaultDebounce)
	b.waitTurns(t, before)
	if closed(changed) {
		t.Fatal("AckChanged fired before a read b's entry")
	}
	tick(t, clock, peers.DefaultInterval, a)
	if !closed(changed) {
		t.Fatal("AckChanged did not fire after a read b's changed entry")
	}
	streams := a.view.Status()
	if len(streams) != 1 || !slices.Equal(streams[0].AckedRoots, []string{rootA, rootB}) {
		t.Errorf("a's view of b's stream: %+v", streams)
	}
}

// TestLocalAckChangeFiresAtOnce: this replica's own ACKs reach
// AckChanged without waiting for a write.
func TestLocalAckChangeFiresAtOnce(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	a := newReplica(t, casClient(), clock, "meshca-a", nil)
	a.run(t)
	changed := a.view.AckChanged()
	a.proxies.Set(stream("web", rootA))
	select {
	case <-changed:
	case <-time.After(time.Minute):
		t.Fatal("AckChanged did not fire after a local ACK")
	}
}

// TestEntryOverTheLimitIsRefused: a write that would take the ConfigMap
// past the API server's 1 MiB is not attempted, and says why.
func TestEntryOverTheLimitIsRefused(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	client := casClient()
	_, err := client.CoreV1().ConfigMaps(ns).Create(context.Background(), &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: peers.DefaultName, Namespace: ns},
		BinaryData: map[string][]byte{"meshca-huge": bytes.Repeat([]byte{1}, corev1.MaxSecretSize-100)},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a := newReplica(t, client, clock, "meshca-a", nil)
	var streams []sds.StreamStatus
	for i := range 50 {
		streams = append(streams, stream(fmt.Sprintf("sa-%d", i), rootA))
	}
	a.proxies.Set(streams...)
	a.run(t)
	if got := testenv.GatheredValue(t, a.reg, "meshca_peers_writes_total", map[string]string{"result": "failed"}); got != 1 {
		t.Fatalf("failed writes = %v, want 1", got)
	}
	if _, ok := getConfigMap(t, client).BinaryData["meshca-a"]; ok {
		t.Error("a's entry was written past the limit")
	}
}

// TestUnknownFormatClosesTheGates: an entry this replica cannot decode
// (here: from a newer format) is never counted as empty, nor removed.
func TestUnknownFormatClosesTheGates(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	client := casClient()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	fmt.Fprintf(zw, `{"format":2,"updatedAt":%q}`, start.Add(-time.Hour).Format(time.RFC3339))
	zw.Close()
	_, err := client.CoreV1().ConfigMaps(ns).Create(context.Background(), &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: peers.DefaultName, Namespace: ns},
		BinaryData: map[string][]byte{"meshca-next": buf.Bytes()},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a := newReplica(t, client, clock, "meshca-a", nil)
	a.run(t)
	_, err = a.view.Valid(context.Background(), clock.Now())
	if err == nil || !strings.Contains(err.Error(), `replica "meshca-next"`) || !strings.Contains(err.Error(), "format 2") {
		t.Fatalf("Valid: %v, want an error naming meshca-next and its format", err)
	}
	if got := testenv.GatheredValue(t, a.reg, "meshca_peers_replicas", map[string]string{"state": "unreadable"}); got != 1 {
		t.Errorf("meshca_peers_replicas{state=unreadable} = %v, want 1", got)
	}
	if _, ok := getConfigMap(t, client).BinaryData["meshca-next"]; !ok {
		t.Error("the undecodable entry was removed")
	}
}

// TestLedgerFailureStopsPublishing: a replica that cannot read its own
// ledger does not publish a partial list; its last entry stays as it was.
func TestLedgerFailureStopsPublishing(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	client := casClient()
	a := newReplica(t, client, clock, "meshca-a", nil)
	a.run(t)
	first := getConfigMap(t, client).BinaryData["meshca-a"]
	a.ledger.Fail(errors.New("audit: disk on fire"))
	tick(t, clock, peers.DefaultInterval, a)
	if got := getConfigMap(t, client).BinaryData["meshca-a"]; !bytes.Equal(got, first) {
		t.Error("a rewrote its entry without its ledger")
	}
	if got := testenv.GatheredValue(t, a.reg, "meshca_peers_writes_total", map[string]string{"result": "failed"}); got != 1 {
		t.Errorf("failed = %v, want 1", got)
	}
}

func TestNewValidates(t *testing.T) {
	base := func() peers.Config {
		return peers.Config{Client: casClient(), Namespace: ns, Identity: "meshca-0_ab12", Proxies: &rotationtest.Proxies{}, Ledger: &rotationtest.Ledger{}}
	}
	for name, tc := range map[string]struct {
		mutate func(*peers.Config)
		want   string
	}{
		"no client":            {func(c *peers.Config) { c.Client = nil }, "a client"},
		"no namespace":         {func(c *peers.Config) { c.Namespace = "" }, "a namespace"},
		"no ledger":            {func(c *peers.Config) { c.Ledger = nil }, "audit ledger"},
		"identity not a key":   {func(c *peers.Config) { c.Identity = "meshca/0" }, `replica identity "meshca/0" is not a ConfigMap key`},
		"no identity":          {func(c *peers.Config) { c.Identity = "" }, "is not a ConfigMap key"},
		"stale between writes": {func(c *peers.Config) { c.FreshFor = time.Second }, "would go stale between two writes"},
	} {
		cfg := base()
		tc.mutate(&cfg)
		if _, err := peers.New(cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", name, err, tc.want)
		}
	}
	if _, err := peers.New(base()); err != nil {
		t.Errorf("valid config: %v", err)
	}
}

// TestEntryKeepsWhatTheGateNeeds: a proxy's long NACK is cut short, as the
// ConfigMap's size is bounded; an expiry is never moved earlier by the
// whole seconds the entry keeps.
func TestEntryKeepsWhatTheGateNeeds(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	client := casClient()
	a := newReplica(t, client, clock, "meshca-a", nil)
	b := newReplica(t, client, clock, "meshca-b", nil)
	nack := stream("db", rootA)
	nack.RejectedRoots, nack.LastNACK = []string{rootB}, strings.Repeat("€", 1000)
	b.proxies.Set(nack)
	expiry := start.Add(time.Hour + 500*time.Millisecond)
	b.ledger.Add(holding("db", rootA, expiry))
	b.run(t)
	a.run(t)

	streams := a.view.Status()
	if len(streams) != 1 {
		t.Fatalf("a sees %d streams, want b's one", len(streams))
	}
	if got := streams[0].LastNACK; len(got) > 260 || !strings.HasPrefix(nack.LastNACK, strings.TrimSuffix(got, "…")) || !utf8.ValidString(got) {
		t.Errorf("NACK as published: %d bytes, %q", len(got), got)
	}
	hs, err := a.view.Valid(context.Background(), expiry)
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 1 || hs[0].NotAfter.Before(expiry) {
		t.Errorf("b's certificate expiring at %s: %+v", expiry.Format(time.StampMilli), hs)
	}
}
