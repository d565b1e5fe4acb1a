package peers_test

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/meshca/meshca/internal/peers"
	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/internal/rotation/rotationtest"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/sds"
)

const ns = "meshca-system"

var start = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

var configMapsResource = corev1.SchemeGroupVersion.WithResource("configmaps")

// casClient is a fake clientset whose ConfigMaps keep the one promise of
// the API server the publisher relies on: every write gets a new
// resourceVersion, and an update from an older one conflicts. (The fake's
// tracker alone accepts any update.) Reactors run one at a time.
func casClient() *fake.Clientset {
	c := fake.NewClientset()
	rv := 0
	c.PrependReactor("*", "configmaps", func(a k8stesting.Action) (bool, runtime.Object, error) {
		// Create and update actions have the same methods: tell them by verb.
		switch a.GetVerb() {
		case "create":
			rv++
			a.(k8stesting.CreateAction).GetObject().(*corev1.ConfigMap).ResourceVersion = strconv.Itoa(rv)
		case "update":
			cm := a.(k8stesting.UpdateAction).GetObject().(*corev1.ConfigMap)
			cur, err := c.Tracker().Get(configMapsResource, cm.Namespace, cm.Name)
			if err != nil {
				return true, nil, err
			}
			if have := cur.(*corev1.ConfigMap).ResourceVersion; have != cm.ResourceVersion {
				return true, nil, apierrors.NewConflict(configMapsResource.GroupResource(), cm.Name,
					fmt.Errorf("resourceVersion %s, stored %s", cm.ResourceVersion, have))
			}
			rv++
			cm.ResourceVersion = strconv.Itoa(rv)
		}
		return false, nil, nil // the tracker stores it
	})
	return c
}

func id(sa string) spiffeid.ID {
	return spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/" + sa)
}

// stream is a connected ROOTCA stream of sa that has ACKed the given roots.
func stream(sa string, acked ...string) sds.StreamStatus {
	return sds.StreamStatus{Peer: sds.Peer{ID: id(sa), Node: sa + "-node"}, Subscribed: []string{sds.RootsName},
		Since: start, AckedRoots: acked}
}

func holding(sa, root string, notAfter time.Time) rotation.Holding {
	return rotation.Holding{SPIFFEID: id(sa).String(), RootFingerprint: root, NotAfter: notAfter}
}

// replica is one server replica's publisher with its own streams and
// ledger.
type replica struct {
	name    string
	pub     *peers.Publisher
	view    *peers.View
	proxies *rotationtest.Proxies
	ledger  *rotationtest.Ledger
	reg     *prometheus.Registry
	stop    func()
}

func newReplica(t *testing.T, client kubernetes.Interface, clock clockwork.Clock, name string, mutate func(*peers.Config)) *replica {
	t.Helper()
	r := &replica{name: name, proxies: &rotationtest.Proxies{}, ledger: &rotationtest.Ledger{}, reg: prometheus.NewRegistry()}
	cfg := peers.Config{Client: client, Namespace: ns, Identity: name, Proxies: r.proxies, Ledger: r.ledger,
		Clock: clock, Metrics: r.reg}
	if mutate != nil {
		mutate(&cfg)
	}
	var err error
	if r.pub, err = peers.New(cfg); err != nil {
		t.Fatal(err)
	}
	r.view = r.pub.View()
	return r
}

// run starts the publisher and waits for its first publication; it stops
// when the test ends or at r.stop, which waits for Run to return.
func (r *replica) run(t *testing.T) {
	t.Helper()
	r.start(t)
	r.waitTurns(t, 0)
}

// start starts the publisher without waiting for anything.
func (r *replica) start(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.pub.Run(ctx) }()
	var once sync.Once
	r.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("%s: Run: %v", r.name, err)
			}
		})
	}
	t.Cleanup(r.stop)
}

// turns counts the publications the replica finished, written or failed.
func (r *replica) turns(t *testing.T) float64 {
	t.Helper()
	return testenv.GatheredValue(t, r.reg, "meshca_peers_writes_total", map[string]string{"result": "written"}) +
		testenv.GatheredValue(t, r.reg, "meshca_peers_writes_total", map[string]string{"result": "failed"})
}

// waitTurns waits until the replica has finished more than n publications.
func (r *replica) waitTurns(t *testing.T, n float64) {
	t.Helper()
	testenv.Eventually(t, r.name+" publishes", func() error {
		if got := r.turns(t); got <= n {
			return fmt.Errorf("%v publications", got)
		}
		return nil
	})
}

// tick advances the clock by d and waits until each running replica has
// published once more (d must reach every replica's next tick).
func tick(t *testing.T, clock *clockwork.FakeClock, d time.Duration, rs ...*replica) {
	t.Helper()
	before := make([]float64, len(rs))
	for i, r := range rs {
		before[i] = r.turns(t)
	}
	clock.Advance(d)
	for i, r := range rs {
		r.waitTurns(t, before[i])
	}
}

// identities lists the SPIFFE IDs of streams, in order.
func identities(streams []sds.StreamStatus) []string {
	var out []string
	for _, s := range streams {
		out = append(out, s.Peer.ID.String())
	}
	return out
}

func getConfigMap(t *testing.T, client kubernetes.Interface) *corev1.ConfigMap {
	t.Helper()
	cm, err := client.CoreV1().ConfigMaps(ns).Get(context.Background(), peers.DefaultName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return cm
}

// closed reports whether ch is closed.
func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
