package istiorender_test

import (
	"strings"
	"testing"

	networkingv1beta1 "istio.io/api/networking/v1beta1"
	securityv1beta1 "istio.io/api/security/v1beta1"
	"sigs.k8s.io/yaml"

	"github.com/meshca/meshca/internal/golden"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/istiorender"
)

const (
	legacy  = "legacy.payments.svc.cluster.local"
	batch   = "*.batch.svc.cluster.local"
	partner = "api.partner.example"
)

// excluding is the policy of a mesh in mode with the usual exclusions: the
// API server and an external host (no sidecars), a service and a namespace
// that run sidecars.
func excluding(enabled bool, mode policy.Mode) istiorender.Input {
	return istiorender.Input{
		Policy: policy.Policy{Enabled: enabled, Mode: mode,
			Excluded: []string{policy.DefaultExcluded, legacy, batch, partner}},
		Workloads: []istiorender.Workload{
			{Service: legacy, Selector: map[string]string{"app": "legacy"}, Ports: []uint32{8080, 9090}},
			{Service: batch},
		},
	}
}

func TestGolden(t *testing.T) {
	tests := []struct {
		name string
		in   istiorender.Input
	}{
		{"strict", excluding(true, policy.ModeStrict)},
		{"permissive", excluding(true, policy.ModePermissive)},
		{"disabled", excluding(false, "")},
		{"default", istiorender.Input{Policy: policy.Default()}},
		{"host-level", istiorender.Input{
			Policy:        policy.Policy{Enabled: true, Excluded: []string{"legacy.payments.svc.example.internal"}},
			RootNamespace: "mesh-root", ClusterDomain: "example.internal",
			Workloads: []istiorender.Workload{{Service: "legacy.payments.svc.example.internal",
				Selector: map[string]string{"app": "legacy", "version": "v1"}}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := istiorender.Render(tt.in)
			if err != nil {
				t.Fatal(err)
			}
			golden.Check(t, tt.name+".yaml", got)
		})
	}
}

// doc is the part of a rendered document the tests read.
type doc struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec map[string]any `json:"spec"`
}

func parse(t *testing.T, out []byte) []doc {
	t.Helper()
	var docs []doc
	for _, part := range strings.Split(string(out), "---\n") {
		var d doc
		if err := yaml.UnmarshalStrict([]byte(part), &d); err != nil {
			t.Fatalf("%v in\n%s", err, part)
		}
		docs = append(docs, d)
	}
	return docs
}

func find(docs []doc, kind, namespace, name string) *doc {
	for i := range docs {
		d := &docs[i]
		if d.Kind == kind && d.Metadata.Namespace == namespace && d.Metadata.Name == name {
			return d
		}
	}
	return nil
}

func TestStrictMeshWithExclusions(t *testing.T) {
	out, err := istiorender.Render(excluding(true, policy.ModeStrict))
	if err != nil {
		t.Fatal(err)
	}
	docs := parse(t, out)
	for _, d := range docs {
		if d.Metadata.Labels[istiorender.ManagedByLabel] != istiorender.ManagedBy {
			t.Errorf("%s %s is not labelled as meshca's", d.Kind, d.Metadata.Name)
		}
	}
	mesh := find(docs, "PeerAuthentication", "istio-system", "default")
	if mesh == nil || mesh.APIVersion != "security.istio.io/v1beta1" || mode(mesh.Spec, "mtls") != "STRICT" || mesh.Spec["selector"] != nil {
		t.Fatalf("mesh-wide policy = %+v, want STRICT without a selector in istio-system", mesh)
	}
	// Client side: every excluded name gets plaintext, explicitly.
	for _, c := range []struct{ host, ns string }{
		{policy.DefaultExcluded, "default"},
		{legacy, "payments"},
		{batch, "batch"},
		{partner, "istio-system"},
	} {
		dr := find(docs, "DestinationRule", c.ns, "meshca-exclude-"+strings.ReplaceAll(c.host, "*", "wildcard"))
		if dr == nil {
			t.Errorf("no DestinationRule for %s in %s", c.host, c.ns)
			continue
		}
		tp, _ := dr.Spec["trafficPolicy"].(map[string]any)
		if dr.APIVersion != "networking.istio.io/v1beta1" || dr.Spec["host"] != c.host || mode(tp, "tls") != "DISABLE" {
			t.Errorf("DestinationRule for %s = %+v", c.host, dr.Spec)
		}
	}
	// Server side: only where sidecars run.
	var pas []string
	for _, d := range docs {
		if d.Kind == "PeerAuthentication" {
			pas = append(pas, d.Metadata.Namespace+"/"+d.Metadata.Name)
		}
	}
	if want := "istio-system/default batch/meshca-exclude-wildcard.batch.svc.cluster.local payments/meshca-exclude-" + legacy; strings.Join(pas, " ") != want {
		t.Errorf("PeerAuthentications = %v, want %s", pas, want)
	}
	port := find(docs, "PeerAuthentication", "payments", "meshca-exclude-"+legacy)
	levels, _ := port.Spec["portLevelMtls"].(map[string]any)
	if port.Spec["mtls"] != nil || len(levels) != 2 || mode(levels, "8080") != "DISABLE" || mode(levels, "9090") != "DISABLE" {
		t.Errorf("legacy's policy = %+v, want plaintext on 8080 and 9090 only", port.Spec)
	}
	ns := find(docs, "PeerAuthentication", "batch", "meshca-exclude-wildcard.batch.svc.cluster.local")
	if ns.Spec["selector"] != nil || mode(ns.Spec, "mtls") != "DISABLE" {
		t.Errorf("batch's policy = %+v, want the whole namespace in plaintext", ns.Spec)
	}
}

func TestDisabledIsOnePolicy(t *testing.T) {
	objs, err := istiorender.Objects(excluding(false, ""))
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 1 {
		t.Fatalf("%d objects, want the mesh-wide policy alone", len(objs))
	}
	pa, ok := objs[0].Spec.(*securityv1beta1.PeerAuthentication)
	if !ok || pa.GetMtls().GetMode() != securityv1beta1.PeerAuthentication_MutualTLS_DISABLE {
		t.Errorf("mesh-wide policy = %v, want DISABLE", objs[0].Spec)
	}
}

func TestObjectsAreTyped(t *testing.T) {
	objs, err := istiorender.Objects(excluding(true, policy.ModePermissive))
	if err != nil {
		t.Fatal(err)
	}
	var drs int
	for _, o := range objs {
		switch s := o.Spec.(type) {
		case *networkingv1beta1.DestinationRule:
			drs++
			if s.GetTrafficPolicy().GetTls().GetMode() != networkingv1beta1.ClientTLSSettings_DISABLE {
				t.Errorf("%s: tls mode %v", o.Name, s.GetTrafficPolicy().GetTls().GetMode())
			}
		case *securityv1beta1.PeerAuthentication:
		default:
			t.Errorf("%s: spec of type %T", o.Name, o.Spec)
		}
	}
	if drs != 4 {
		t.Errorf("%d DestinationRules, want one per excluded name", drs)
	}
	if pa := objs[0].Spec.(*securityv1beta1.PeerAuthentication); pa.GetMtls().GetMode() != securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE {
		t.Errorf("mesh-wide mode = %v, want PERMISSIVE", pa.GetMtls().GetMode())
	}
}

func TestLongNamesAreShortened(t *testing.T) {
	host := strings.Repeat("a", 60) + "." + strings.Repeat("b", 60) + "." + strings.Repeat("c", 60) + ".example.com"
	objs, err := istiorender.Objects(istiorender.Input{Policy: policy.Policy{Enabled: true, Excluded: []string{host}}})
	if err != nil {
		t.Fatal(err)
	}
	if n := objs[1].Name; len(n) > 253 || !strings.HasPrefix(n, "meshca-exclude-aaa") {
		t.Errorf("name %q (%d characters)", n, len(n))
	}
}

func TestRefusesWhatIstioWouldIgnore(t *testing.T) {
	on := func(excluded ...string) policy.Policy { return policy.Policy{Enabled: true, Excluded: excluded} }
	tests := []struct {
		name string
		in   istiorender.Input
		want string
	}{
		{"invalid policy", istiorender.Input{Policy: policy.Policy{Enabled: true, Mode: "SOMETIMES"}}, "SOMETIMES"},
		{"bad root namespace", istiorender.Input{Policy: on(), RootNamespace: "Istio_System"}, "root namespace"},
		{"workload not excluded", istiorender.Input{Policy: on(legacy),
			Workloads: []istiorender.Workload{{Service: "other.payments.svc.cluster.local", Selector: map[string]string{"app": "x"}}}},
			"not excluded"},
		{"workload twice", istiorender.Input{Policy: on(legacy), Workloads: []istiorender.Workload{
			{Service: legacy, Selector: map[string]string{"app": "x"}}, {Service: strings.ToUpper(legacy), Selector: map[string]string{"app": "y"}}}},
			"declared twice"},
		{"service without selector", istiorender.Input{Policy: on(legacy), Workloads: []istiorender.Workload{{Service: legacy}}},
			"labels of its pods"},
		{"ports without selector", istiorender.Input{Policy: on(batch), Workloads: []istiorender.Workload{{Service: batch, Ports: []uint32{80}}}},
			"need a selector"},
		{"bad port", istiorender.Input{Policy: on(legacy), Workloads: []istiorender.Workload{
			{Service: legacy, Selector: map[string]string{"app": "x"}, Ports: []uint32{70000}}}}, "out of range"},
		{"bad label", istiorender.Input{Policy: on(legacy), Workloads: []istiorender.Workload{
			{Service: legacy, Selector: map[string]string{"app": "not valid!"}}}}, "label app"},
		{"external workload", istiorender.Input{Policy: on(partner), Workloads: []istiorender.Workload{
			{Service: partner, Selector: map[string]string{"app": "x"}}}}, "not a service or namespace"},
		{"wider than a namespace", istiorender.Input{Policy: on("*.svc.cluster.local"), Workloads: []istiorender.Workload{
			{Service: "*.svc.cluster.local"}}}, "not a service or namespace"},
		{"root namespace", istiorender.Input{Policy: on("istiod.istio-system.svc.cluster.local"), Workloads: []istiorender.Workload{
			{Service: "istiod.istio-system.svc.cluster.local", Selector: map[string]string{"app": "istiod"}}}}, "ignores workload selectors"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := istiorender.Render(tt.in)
			if err == nil || !strings.HasPrefix(err.Error(), "istiorender: ") || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Render = %v, want an istiorender error mentioning %q", err, tt.want)
			}
		})
	}
}

// mode reads m[key].mode.
func mode(m map[string]any, key string) any {
	sub, _ := m[key].(map[string]any)
	return sub["mode"]
}
