package peers_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/peers"
	"github.com/meshca/meshca/internal/rotation"
)

// converge ticks the replicas until cond holds, failing after a few
// rounds: enough for each to have written and read the others.
func converge(t *testing.T, clock *clockwork.FakeClock, what string, cond func() error, rs ...*replica) {
	t.Helper()
	var err error
	for range 4 {
		if err = cond(); err == nil {
			return
		}
		tick(t, clock, peers.DefaultInterval, rs...)
	}
	if err = cond(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// TestRotationGateSeesEveryReplica runs root rotation on the leader with
// the merged view: a proxy connected only to the follower holds activate
// back until the follower's entry shows its ACK, and a certificate only
// the follower issued holds retire back until it expires, even after the
// follower is gone. While the ConfigMap cannot be read, the steps fail
// saying so.
func TestRotationGateSeesEveryReplica(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	client := casClient()
	var failing atomic.Bool // the API server is out of reach
	client.PrependReactor("get", "configmaps", func(k8stesting.Action) (bool, runtime.Object, error) {
		if failing.Load() {
			return true, nil, apierrors.NewServiceUnavailable("apiserver unreachable")
		}
		return false, nil, nil
	})
	leader := newReplica(t, client, clock, "meshca-leader", nil)
	follower := newReplica(t, client, clock, "meshca-follower", nil)
	auth := catest.NewAuthority(t, clock)
	rot, err := rotation.New(rotation.Config{CA: auth, Proxies: leader.view, Ledger: leader.view, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	// What the leader would decide from its own streams and ledger alone.
	alone, err := rotation.New(rotation.Config{CA: auth, Proxies: leader.proxies, Ledger: leader.ledger, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	status := func(r *rotation.Rotator) rotation.Status {
		t.Helper()
		st, err := r.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	leader.run(t)
	follower.run(t)

	if _, err := rot.Step(context.Background(), ca.StepPrepare, rotation.Options{}); err != nil {
		t.Fatal(err)
	}
	r, _ := auth.Rotation()
	a, b := ca.Fingerprint(r.Current), ca.Fingerprint(r.Next)
	leader.proxies.Set(stream("web", a, b))
	follower.proxies.Set(stream("db", a))
	converge(t, clock, "the leader sees the follower's proxy", func() error {
		if n := status(rot).Proxies; n != 2 {
			return fmt.Errorf("%d proxies", n)
		}
		return nil
	}, leader, follower)

	if st := status(alone); len(st.Blockers) != 0 {
		t.Fatalf("the leader alone would be blocked too, so this test shows nothing: %v", st.Blockers)
	}
	_, err = rot.Step(context.Background(), ca.StepActivate, rotation.Options{})
	if !errors.Is(err, rotation.ErrBlocked) {
		t.Fatalf("activate with the follower's proxy behind: %v, want ErrBlocked", err)
	}
	for _, want := range []string{"1 of 2 proxies", "1 connected but not ACKed yet"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not say %q", err, want)
		}
	}
	st := status(rot)
	if len(st.Missing) != 1 || st.Missing[0] != (rotation.Proxy{Identity: id("db").String(), Node: "db-node", State: rotation.StatePending}) {
		t.Errorf("missing = %+v, want the follower's db proxy, pending", st.Missing)
	}

	follower.proxies.Set(stream("db", a, b))
	converge(t, clock, "the leader sees the follower's proxy ACK", func() error {
		if st := status(rot); len(st.Blockers) > 0 {
			return fmt.Errorf("blocked: %v", st.Blockers)
		}
		return nil
	}, leader, follower)
	if _, err := rot.Step(context.Background(), ca.StepActivate, rotation.Options{}); err != nil {
		t.Fatalf("activate once every proxy ACKed: %v", err)
	}

	// A certificate under the old root that only the follower's ledger
	// knows.
	expiry := clock.Now().Add(time.Hour)
	follower.ledger.Add(holding("db", a, expiry))
	converge(t, clock, "the leader sees the follower's certificate", func() error {
		if st := status(rot); len(st.Blockers) == 0 {
			return errors.New("retire is not blocked")
		}
		return nil
	}, leader, follower)
	if st := status(alone); len(st.Blockers) != 0 {
		t.Fatalf("the leader alone would be blocked too: %v", st.Blockers)
	}
	_, err = rot.Step(context.Background(), ca.StepRetire, rotation.Options{})
	if !errors.Is(err, rotation.ErrBlocked) || !strings.Contains(err.Error(), "1 live certificate(s) still chain to retiring root") {
		t.Fatalf("retire with the follower's certificate live: %v, want ErrBlocked naming it", err)
	}

	// The follower goes away: its certificate is still out there.
	follower.stop()
	tick(t, clock, 20*time.Second, leader)
	if _, err := rot.Step(context.Background(), ca.StepRetire, rotation.Options{}); !errors.Is(err, rotation.ErrBlocked) {
		t.Fatalf("retire after the follower left, its certificate live: %v, want ErrBlocked", err)
	}

	failing.Store(true)
	tick(t, clock, peers.DefaultInterval, leader)
	_, err = rot.Step(context.Background(), ca.StepRetire, rotation.Options{})
	_, statusErr := rot.Status(context.Background()) // what `meshca root status` shows
	for what, err := range map[string]error{"retire": err, "status": statusErr} {
		if err == nil || errors.Is(err, rotation.ErrBlocked) || !strings.Contains(err.Error(), "reading ConfigMap meshca-system/meshca-replicas") ||
			!strings.Contains(err.Error(), "apiserver unreachable") {
			t.Errorf("%s while the ConfigMap cannot be read: %v, want it refused naming the ConfigMap and the cause", what, err)
		}
	}
	if r, _ := auth.Rotation(); r.Phase != ca.PhaseActivated {
		t.Fatalf("phase %s after refused steps", r.Phase)
	}
	failing.Store(false)

	// Past the certificate's expiry, retire may go ahead.
	tick(t, clock, time.Hour, leader)
	if _, err := rot.Step(context.Background(), ca.StepRetire, rotation.Options{}); err != nil {
		t.Fatalf("retire once the follower's certificate expired: %v", err)
	}
}
