package kubestore_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/kubestore"
	"github.com/meshca/meshca/internal/testenv"
)

const ns = "meshca-system"

type storeEnv struct {
	store *kubestore.Store
	reg   *prometheus.Registry
}

// startStore runs a store on ConfigMap ns/name until the test ends.
func startStore(t *testing.T, client kubernetes.Interface, name string) *storeEnv {
	t.Helper()
	reg := prometheus.NewRegistry()
	s, err := kubestore.New(kubestore.Config{
		Client: client, Namespace: ns, Name: name, Metrics: policy.NewMetrics(reg),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return &storeEnv{store: s, reg: reg}
}

func (e *storeEnv) metric(t *testing.T, name string) float64 {
	t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			m := mf.GetMetric()[0]
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// waitFor waits until the store's policy satisfies ok.
func (e *storeEnv) waitFor(t *testing.T, what string, ok func(policy.Policy, policy.Revision) bool) {
	t.Helper()
	testenv.Eventually(t, what, func() error {
		if p, rev := e.store.Current(); !ok(p, rev) {
			return fmt.Errorf("policy is %v at revision %q", p, rev)
		}
		return nil
	})
}

func addExcluded(names ...string) func(policy.Policy) (policy.Policy, error) {
	return func(p policy.Policy) (policy.Policy, error) {
		p.Excluded = append(p.Excluded, names...)
		return p, nil
	}
}

func getData(t *testing.T, client kubernetes.Interface, name string) map[string]string {
	t.Helper()
	cm, err := client.CoreV1().ConfigMaps(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return cm.Data
}

// edit changes the ConfigMap as `kubectl edit` does: a plain Update.
func edit(t *testing.T, client kubernetes.Interface, name string, change func(map[string]string)) {
	t.Helper()
	cms := client.CoreV1().ConfigMaps(ns)
	cm, err := cms.Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	change(cm.Data)
	if _, err := cms.Update(t.Context(), cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestAgainstAPIServer(t *testing.T) {
	env := testenv.StartKube(t)
	client := env.Clientset()
	env.CreateNamespace(t, ns)

	t.Run("the ConfigMap is the source of truth", func(t *testing.T) {
		const name = "mesh-policy"
		e := startStore(t, client, name)
		if err := e.store.WaitForSync(t.Context()); err != nil {
			t.Fatal(err)
		}
		if p, rev := e.store.Current(); !p.Equal(policy.Default()) || rev != "" {
			t.Fatalf("with no ConfigMap Current = %v, %q; want Default", p, rev)
		}

		// Update creates the ConfigMap.
		got, err := e.store.Update(t.Context(), func(p policy.Policy) (policy.Policy, error) {
			p.Enabled = true
			return p, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if !got.Enabled || !slices.Equal(got.Excluded, []string{policy.DefaultExcluded}) {
			t.Errorf("Update = %v", got)
		}
		e.waitFor(t, "the created ConfigMap", func(p policy.Policy, rev policy.Revision) bool { return p.Enabled && rev != "" })
		if data := getData(t, client, name); data[policy.KeyEnabled] != "true" || data[policy.KeyExcluded] != `["`+policy.DefaultExcluded+`"]` {
			t.Errorf("stored data = %v", data)
		}

		// A hand edit is picked up live, unknown keys and all.
		changed := e.store.Changed()
		edit(t, client, name, func(d map[string]string) {
			d[policy.KeyMode] = "PERMISSIVE"
			d[policy.KeyExcluded] = "- legacy.shop.svc.cluster.local\n- '*.kube-system.svc.cluster.local'\n"
			d["owner"] = "platform-team"
		})
		<-changed
		e.waitFor(t, "the hand edit", func(p policy.Policy, _ policy.Revision) bool {
			return p.Equal(policy.Policy{Enabled: true, Mode: policy.ModePermissive, Excluded: []string{
				"*.kube-system.svc.cluster.local", "legacy.shop.svc.cluster.local",
			}})
		})
		if p, _ := e.store.Current(); p.ModeFor("dns.kube-system.svc.cluster.local") != policy.ModeDisable {
			t.Errorf("%v does not exclude kube-system", p)
		}

		// Update keeps keys it does not know.
		if _, err := e.store.Update(t.Context(), addExcluded("api.shop.svc.cluster.local")); err != nil {
			t.Fatal(err)
		}
		data := getData(t, client, name)
		if data["owner"] != "platform-team" || !strings.Contains(data[policy.KeyExcluded], `"api.shop.svc.cluster.local"`) {
			t.Errorf("after Update data = %v", data)
		}
		e.waitFor(t, "our own update", func(p policy.Policy, _ policy.Revision) bool {
			return slices.Contains(p.Excluded, "api.shop.svc.cluster.local")
		})

		// An invalid update stores nothing and names the culprit.
		before := getData(t, client, name)
		_, err = e.store.Update(t.Context(), addExcluded("fine.example", "*.bad_name.example"))
		if !errors.Is(err, policy.ErrInvalid) || !strings.Contains(err.Error(), `"*.bad_name.example"`) {
			t.Errorf("invalid Update = %v", err)
		}
		if after := getData(t, client, name); !maps.Equal(before, after) {
			t.Errorf("invalid Update changed the ConfigMap: %v", after)
		}

		// A new store, as after a restart, reads the same policy.
		want, _ := e.store.Current()
		restarted := startStore(t, client, name)
		if err := restarted.store.WaitForSync(t.Context()); err != nil {
			t.Fatal(err)
		}
		if p, rev := restarted.store.Current(); !p.Equal(want) || rev == "" {
			t.Errorf("after restart Current = %v, %q; want %v", p, rev, want)
		}

		// Deleting the ConfigMap is the default policy.
		if err := client.CoreV1().ConfigMaps(ns).Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		e.waitFor(t, "the default after deletion", func(p policy.Policy, rev policy.Revision) bool {
			return p.Equal(policy.Default()) && rev == ""
		})
	})

	t.Run("concurrent updates both survive a conflict", func(t *testing.T) {
		const name = "mesh-policy-race"
		e := startStore(t, client, name)
		if _, err := e.store.Update(t.Context(), addExcluded("seed.example")); err != nil {
			t.Fatal(err)
		}
		// Both updates read the same resourceVersion before either
		// writes, so exactly one write conflicts and is retried.
		var bothRead sync.WaitGroup
		bothRead.Add(2)
		var wg sync.WaitGroup
		for _, n := range []string{"first.example", "second.example"} {
			wg.Go(func() {
				once := sync.OnceFunc(func() { bothRead.Done(); bothRead.Wait() })
				_, err := e.store.Update(t.Context(), func(p policy.Policy) (policy.Policy, error) {
					once()
					p.Excluded = append(p.Excluded, n)
					return p, nil
				})
				if err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
		if c := e.metric(t, "meshca_policy_update_conflicts_total"); c != 1 {
			t.Errorf("conflicts = %v, want 1", c)
		}
		p, err := policy.ParseConfigMap(getData(t, client, name))
		if err != nil {
			t.Fatal(err)
		}
		want := []string{"first.example", policy.DefaultExcluded, "second.example", "seed.example"}
		if !slices.Equal(p.Excluded, want) {
			t.Errorf("stored exclusions = %q, want %q", p.Excluded, want)
		}
		e.waitFor(t, "both updates", func(p policy.Policy, _ policy.Revision) bool { return slices.Equal(p.Excluded, want) })
	})

	t.Run("many writers in two replicas lose nothing", func(t *testing.T) {
		const name = "mesh-policy-stress"
		a, b := startStore(t, client, name), startStore(t, client, name)
		const writers, each = 6, 5
		var wg sync.WaitGroup
		for w := range writers {
			s := []*kubestore.Store{a.store, b.store}[w%2]
			wg.Go(func() {
				for i := range each {
					if _, err := s.Update(t.Context(), addExcluded(fmt.Sprintf("w%d-%d.example", w, i))); err != nil {
						t.Error(err)
					}
				}
			})
		}
		wg.Wait()
		p, err := policy.ParseConfigMap(getData(t, client, name))
		if err != nil {
			t.Fatal(err)
		}
		if len(p.Excluded) != writers*each+1 {
			t.Errorf("stored %d exclusions, want %d", len(p.Excluded), writers*each+1)
		}
		t.Logf("%d conflicts retried", int(a.metric(t, "meshca_policy_update_conflicts_total")+b.metric(t, "meshca_policy_update_conflicts_total")))
	})

	t.Run("a malformed edit keeps the last good policy", func(t *testing.T) {
		const name = "mesh-policy-malformed"
		e := startStore(t, client, name)
		if _, err := e.store.Update(t.Context(), func(p policy.Policy) (policy.Policy, error) {
			p.Enabled = true
			return p, nil
		}); err != nil {
			t.Fatal(err)
		}
		e.waitFor(t, "the first policy", func(p policy.Policy, _ policy.Revision) bool { return p.Enabled })
		good, goodRev := e.store.Current()

		edit(t, client, name, func(d map[string]string) {
			d[policy.KeyMode] = "MUTUAL"
			d[policy.KeyExcluded] = `["ok.example", "not ok.example"]`
		})
		testenv.Eventually(t, "the parse error", func() error {
			if e.store.Status().Err == nil {
				return errors.New("no error in Status")
			}
			return nil
		})
		st := e.store.Status()
		if !errors.Is(st.Err, policy.ErrInvalid) || !strings.Contains(st.Err.Error(), `"MUTUAL"`) || !strings.Contains(st.Err.Error(), `"not ok.example"`) {
			t.Errorf("Status.Err = %v; want both problems named", st.Err)
		}
		if p, rev := e.store.Current(); !p.Equal(good) || rev != goodRev {
			t.Errorf("Current = %v, %q; want the last good %v, %q", p, rev, good, goodRev)
		}
		if v := e.metric(t, "meshca_policy_parse_errors_total"); v != 1 {
			t.Errorf("parse errors = %v, want 1", v)
		}
		if v := e.metric(t, "meshca_policy_source_valid"); v != 0 {
			t.Errorf("source valid = %v, want 0", v)
		}
		if _, err := e.store.Update(t.Context(), addExcluded("x.example")); !errors.Is(err, policy.ErrMalformed) {
			t.Errorf("Update over a malformed ConfigMap = %v; want a refusal", err)
		}

		// A store started now has no good policy to keep: it stays
		// unsynced rather than start with one nobody wrote.
		late := startStore(t, client, name)
		testenv.Eventually(t, "the late store's parse error", func() error {
			if late.store.Status().Err == nil {
				return errors.New("no error in Status")
			}
			return nil
		})
		if late.store.Synced() {
			t.Error("a store on a malformed ConfigMap reports synced")
		}

		edit(t, client, name, func(d map[string]string) { d[policy.KeyMode] = "STRICT"; d[policy.KeyExcluded] = "ok.example" })
		for _, s := range []*storeEnv{e, late} {
			s.waitFor(t, "the fix", func(p policy.Policy, _ policy.Revision) bool {
				return slices.Equal(p.Excluded, []string{"ok.example"})
			})
			if st := s.store.Status(); st.Err != nil {
				t.Errorf("Status after the fix = %v", st)
			}
		}
		if err := late.store.WaitForSync(t.Context()); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("inventory", func(t *testing.T) {
		const appNS = "shop"
		env.CreateServiceAccount(t, appNS, "web")
		env.CreatePod(t, appNS, "web-1", "web")
		env.CreatePod(t, appNS, "web-2", "web")
		ctx := t.Context()
		for _, svc := range []string{"web", "legacy", "idle"} {
			_, err := client.CoreV1().Services(appNS).Create(ctx, &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: svc},
				Spec: corev1.ServiceSpec{
					Selector: map[string]string{"app": svc},
					Ports:    []corev1.ServicePort{{Port: 8080}},
				},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
		}
		// No controller-manager runs: write the slices it would.
		yes := true
		eps := []*discoveryv1.EndpointSlice{
			{
				ObjectMeta:  metav1.ObjectMeta{Name: "web-abc", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
				AddressType: discoveryv1.AddressTypeIPv4,
				Endpoints: []discoveryv1.Endpoint{
					{Addresses: []string{"10.1.0.1"}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: appNS, Name: "web-1"}},
					{Addresses: []string{"10.1.0.2"}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: appNS, Name: "web-2"}},
					{Addresses: []string{"10.1.0.9"}, Conditions: discoveryv1.EndpointConditions{Terminating: &yes},
						TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: appNS, Name: "web-0"}},
				},
			},
			{
				// A second slice repeating an endpoint, as during a move.
				ObjectMeta:  metav1.ObjectMeta{Name: "web-def", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
				AddressType: discoveryv1.AddressTypeIPv4,
				Endpoints: []discoveryv1.Endpoint{
					{Addresses: []string{"10.1.0.2"}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: appNS, Name: "web-2"}},
				},
			},
			{
				ObjectMeta:  metav1.ObjectMeta{Name: "legacy-manual", Labels: map[string]string{discoveryv1.LabelServiceName: "legacy"}},
				AddressType: discoveryv1.AddressTypeIPv4,
				Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"192.0.2.10"}}},
			},
		}
		for _, s := range eps {
			if _, err := client.DiscoveryV1().EndpointSlices(appNS).Create(ctx, s, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}

		inv, err := kubestore.NewInventory(kubestore.InventoryConfig{Client: client, ClusterDomain: "corp.internal"})
		if err != nil {
			t.Fatal(err)
		}
		services, err := inv.Services(ctx)
		if err != nil {
			t.Fatal(err)
		}
		byName := map[string]policy.Service{}
		for _, s := range services {
			byName[s.FQDN] = s
		}
		web := byName["web.shop.svc.corp.internal"]
		wantWeb := []policy.Endpoint{{Namespace: appNS, Pod: "web-1", Addr: "10.1.0.1"}, {Namespace: appNS, Pod: "web-2", Addr: "10.1.0.2"}}
		if !slices.Equal(web.Endpoints, wantWeb) {
			t.Errorf("web endpoints = %v, want %v", web.Endpoints, wantWeb)
		}
		if legacy := byName["legacy.shop.svc.corp.internal"]; !slices.Equal(legacy.Endpoints, []policy.Endpoint{{Namespace: appNS, Addr: "192.0.2.10"}}) {
			t.Errorf("legacy endpoints = %v", legacy.Endpoints)
		}
		if idle, ok := byName["idle.shop.svc.corp.internal"]; !ok || len(idle.Endpoints) != 0 {
			t.Errorf("idle = %v, %v", idle, ok)
		}

		// Only web-1 runs a proxy with a certificate.
		hasProxy := func(e policy.Endpoint) bool { return e.Pod == "web-1" }
		findings := policy.Plan(policy.Policy{Enabled: true}, services, hasProxy)
		var names []string
		for _, f := range findings {
			names = append(names, f.Service)
		}
		if want := []string{"legacy.shop.svc.corp.internal", "web.shop.svc.corp.internal"}; !slices.Equal(names, want) {
			t.Errorf("Plan named %q, want %q", names, want)
		}
		excl := policy.Policy{Enabled: true, Excluded: []string{"*.shop.svc.corp.internal"}}
		if f := policy.Plan(excl, services, hasProxy); len(f) != 0 {
			t.Errorf("Plan with the namespace excluded = %v", f)
		}

		// One namespace, and the default domain. The apiserver makes the
		// kubernetes Service itself, the one Default excludes.
		inv, err = kubestore.NewInventory(kubestore.InventoryConfig{Client: client, Namespace: "default"})
		if err != nil {
			t.Fatal(err)
		}
		services, err = inv.Services(ctx)
		if err != nil || len(services) != 1 || services[0].FQDN != policy.DefaultExcluded {
			t.Errorf("services in default = %v, %v; want just %s", services, err, policy.DefaultExcluded)
		}
		inv, err = kubestore.NewInventory(kubestore.InventoryConfig{Client: client, Namespace: appNS})
		if err != nil {
			t.Fatal(err)
		}
		services, err = inv.Services(ctx)
		if err != nil || len(services) != 3 || services[2].FQDN != "web.shop.svc.cluster.local" {
			t.Errorf("services in %s = %v, %v", appNS, services, err)
		}
	})
}
