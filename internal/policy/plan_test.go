package policy_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/meshca/meshca/internal/policy"
)

func TestPlan(t *testing.T) {
	proxied := map[string]bool{"shop/web-1": true, "shop/web-2": true, "shop/api-1": true}
	hasProxy := func(e policy.Endpoint) bool { return proxied[e.Namespace+"/"+e.Pod] }
	ep := func(ns, pod, addr string) policy.Endpoint {
		return policy.Endpoint{Namespace: ns, Pod: pod, Addr: addr}
	}
	services := []policy.Service{
		{FQDN: "web.shop.svc.cluster.local", Endpoints: []policy.Endpoint{ep("shop", "web-1", "10.0.0.1"), ep("shop", "web-2", "10.0.0.2")}},
		{FQDN: "API.shop.svc.cluster.local.", Endpoints: []policy.Endpoint{ep("shop", "api-1", "10.0.0.3"), ep("shop", "api-2", "10.0.0.4")}},
		{FQDN: "db.shop.svc.cluster.local", Endpoints: []policy.Endpoint{ep("shop", "db-0", "10.0.0.5")}},
		{FQDN: "empty.shop.svc.cluster.local"},
		{FQDN: "kubernetes.default.svc.cluster.local", Endpoints: []policy.Endpoint{ep("", "", "172.18.0.2")}},
		{FQDN: "dns.kube-system.svc.cluster.local", Endpoints: []policy.Endpoint{ep("kube-system", "coredns-1", "10.0.1.1")}},
	}
	strict := policy.Policy{Enabled: true, Excluded: []string{policy.DefaultExcluded, "*.kube-system.svc.cluster.local"}}

	got := policy.Plan(strict, services, hasProxy)
	var names []string
	for _, f := range got {
		names = append(names, f.Service)
	}
	if want := []string{"api.shop.svc.cluster.local", "db.shop.svc.cluster.local"}; !slices.Equal(names, want) {
		t.Fatalf("Plan named %q, want %q", names, want)
	}
	api, db := got[0], got[1]
	if api.All() || api.Endpoints != 2 || !slices.Equal(api.Unproxied, []policy.Endpoint{ep("shop", "api-2", "10.0.0.4")}) {
		t.Errorf("api finding = %+v", api)
	}
	if !db.All() || db.Mode != policy.ModeStrict {
		t.Errorf("db finding = %+v", db)
	}
	if s := api.String(); !strings.Contains(s, "1 of 2") || !strings.Contains(s, "shop/api-2 10.0.0.4") {
		t.Errorf("String() = %q", s)
	}

	// Without the exclusions the API server and DNS break too.
	got = policy.Plan(policy.Policy{Enabled: true}, services, hasProxy)
	if len(got) != 4 {
		t.Errorf("Plan without exclusions = %v, want 4 findings", got)
	}
	// PERMISSIVE and disabled policies break nothing.
	for _, p := range []policy.Policy{{Enabled: true, Mode: policy.ModePermissive}, policy.Default()} {
		if got := policy.Plan(p, services, hasProxy); len(got) != 0 {
			t.Errorf("Plan(%v) = %v, want nothing", p, got)
		}
	}
}
