package peers_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshca/meshca/internal/peers"
	"github.com/meshca/meshca/internal/testenv"
)

// TestReplicasConvergeAgainstAPIServer: two replicas, each with its own
// streams and ledger, write one ConfigMap on a real API server as a
// service account that may only get, update and create ConfigMaps in its
// namespace; writing every 100 ms they race each other's updates, and each
// ends up seeing both. Once one stops, its streams drop out of the
// other's view and its certificates stay.
func TestReplicasConvergeAgainstAPIServer(t *testing.T) {
	env := testenv.StartKube(t)
	admin := env.Clientset()
	const sa = "meshca"
	env.CreateServiceAccount(t, ns, sa)
	grantConfigMaps(t, admin, sa, "get", "update", "create")
	// Each replica has a client of its own, as each server process does: a
	// shared one would also share its rate limiter, and lock the two
	// replicas' reads and writes into step.
	client := func() kubernetes.Interface {
		cfg := env.ConfigFor(t, ns, sa)
		cfg.QPS, cfg.Burst = 100, 200
		c, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	// The API server's RBAC cache takes a moment to see new grants.
	probe := client()
	testenv.Eventually(t, "the grant applies", func() error {
		_, err := probe.CoreV1().ConfigMaps(ns).Get(context.Background(), peers.DefaultName, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("GET: %v", err)
	})

	clock := clockwork.NewRealClock()
	fast := func(c *peers.Config) {
		c.Interval, c.Debounce, c.FreshFor = 100*time.Millisecond, 10*time.Millisecond, 2*time.Second
	}
	a := newReplica(t, client(), clock, "meshca-0_0a0a0a0a", fast)
	b := newReplica(t, client(), clock, "meshca-1_0b0b0b0b", fast)
	now := time.Now()
	a.proxies.Set(stream("web", rootA, rootB))
	a.ledger.Add(holding("web", rootA, now.Add(time.Hour)))
	b.proxies.Set(stream("db", rootA))
	b.ledger.Add(holding("db", rootA, now.Add(time.Hour)))
	a.run(t)
	b.run(t)

	both := []string{id("db").String(), id("web").String()}
	for _, r := range []*replica{a, b} {
		testenv.Eventually(t, r.name+" sees both replicas", func() error {
			return sees(r, both, both)
		})
	}
	// Let them race for a while: neither may drop the other's key.
	for _, r := range []*replica{a, b} {
		r.waitTurns(t, r.turns(t)+10)
	}
	for _, r := range []*replica{a, b} {
		if err := sees(r, both, both); err != nil {
			t.Errorf("%s after more writes: %v", r.name, err)
		}
	}
	cm := getConfigMap(t, admin)
	if _, ok := cm.BinaryData[a.name]; !ok {
		t.Errorf("a's key is missing: %v", slices.Collect(maps.Keys(cm.BinaryData)))
	}
	if _, ok := cm.BinaryData[b.name]; !ok {
		t.Errorf("b's key is missing: %v", slices.Collect(maps.Keys(cm.BinaryData)))
	}
	if cm.Labels["app.kubernetes.io/name"] != "meshca" || cm.Labels["app.kubernetes.io/component"] != "replicas" {
		t.Errorf("labels %v", cm.Labels)
	}

	// b's proxy ACKs the new root: a sees it.
	b.proxies.Set(stream("db", rootA, rootB))
	testenv.Eventually(t, "a sees b's ACK", func() error {
		for _, s := range a.view.Status() {
			if s.Peer.ID == id("db") && slices.Equal(s.AckedRoots, []string{rootA, rootB}) {
				return nil
			}
		}
		return errors.New("not yet")
	})

	for _, r := range []*replica{a, b} {
		t.Logf("%s: %v writes, %v conflicts retried", r.name,
			testenv.GatheredValue(t, r.reg, "meshca_peers_writes_total", map[string]string{"result": "written"}),
			testenv.GatheredValue(t, r.reg, "meshca_peers_writes_total", map[string]string{"result": "conflict"}))
	}
	b.stop()
	testenv.Eventually(t, "b's streams leave a's view, its certificates stay", func() error {
		return sees(a, []string{id("web").String()}, both)
	})
}

// sees checks r's merged streams and live certificates by SPIFFE ID.
func sees(r *replica, streams, holdings []string) error {
	got := identities(r.view.Status())
	slices.Sort(got)
	if !slices.Equal(got, streams) {
		return fmt.Errorf("streams of %v, want %v", got, streams)
	}
	hs, err := r.view.Valid(context.Background(), time.Now())
	if err != nil {
		return err
	}
	var ids []string
	for _, h := range hs {
		ids = append(ids, h.SPIFFEID)
	}
	slices.Sort(ids)
	if !slices.Equal(ids, holdings) {
		return fmt.Errorf("certificates of %v, want %v", ids, holdings)
	}
	return nil
}

// grantConfigMaps lets service account sa do verbs on ConfigMaps in ns,
// and nothing else.
func grantConfigMaps(t *testing.T, client kubernetes.Interface, sa string, verbs ...string) {
	t.Helper()
	role := &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "meshca-replicas"},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: verbs}},
	}
	if _, err := client.RbacV1().Roles(ns).Create(t.Context(), role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "meshca-replicas"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: sa}},
	}
	if _, err := client.RbacV1().RoleBindings(ns).Create(t.Context(), binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}
