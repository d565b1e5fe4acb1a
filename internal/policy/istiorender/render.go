package istiorender

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	networkingv1beta1 "istio.io/api/networking/v1beta1"
	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"

	"github.com/meshca/meshca/internal/policy"
)

// API versions and kinds rendered.
const (
	SecurityAPIVersion     = "security.istio.io/v1beta1"
	NetworkingAPIVersion   = "networking.istio.io/v1beta1"
	KindPeerAuthentication = "PeerAuthentication"
	KindDestinationRule    = "DestinationRule"
)

// Defaults for the zero values of Input.
const (
	DefaultRootNamespace = "istio-system"
	DefaultClusterDomain = "cluster.local"
)

// ManagedByLabel and ManagedBy mark every object rendered.
const (
	ManagedByLabel = "app.kubernetes.io/managed-by"
	ManagedBy      = "meshca"
)

// namePrefix starts the name of every per-service object.
const namePrefix = "meshca-exclude-"

// Input is what Render needs.
type Input struct {
	Policy policy.Policy
	// RootNamespace is Istio's root namespace; empty means istio-system.
	RootNamespace string
	// ClusterDomain is the cluster's DNS domain; empty means cluster.local.
	ClusterDomain string
	// Workloads declares the excluded names whose pods run sidecars.
	Workloads []Workload
}

// Workload is an excluded service (or namespace) whose pods run sidecars
// and must therefore be told to accept plaintext.
type Workload struct {
	// Service is the entry of Policy.Excluded it is for: an exact service
	// name "<name>.<namespace>.svc.<cluster domain>", or a whole namespace
	// "*.<namespace>.svc.<cluster domain>".
	Service string
	// Selector are the labels of the service's pods. Required for a
	// service; empty for a namespace means every pod in it.
	Selector map[string]string
	// Ports, when set, are the only pod ports (container ports, not the
	// service's) that accept plaintext; the others keep the mesh's mode.
	// They need a Selector.
	Ports []uint32
}

// Object is one Kubernetes object rendered.
type Object struct {
	APIVersion string
	Kind       string
	Name       string
	Namespace  string
	// Spec is a *securityv1beta1.PeerAuthentication or a
	// *networkingv1beta1.DestinationRule.
	Spec proto.Message
}

// Render returns the objects of in as multi-document YAML.
func Render(in Input) ([]byte, error) {
	objs, err := Objects(in)
	if err != nil {
		return nil, err
	}
	return Marshal(objs)
}

// Objects returns the objects of in: the mesh-wide policy first, then those
// of each excluded name, sorted as policy.Normalize sorts them.
func Objects(in Input) ([]Object, error) {
	in, err := in.normalize()
	if err != nil {
		return nil, err
	}
	pol := in.Policy
	mode := policy.ModeDisable
	if pol.Enabled {
		mode = pol.EffectiveMode()
	}
	mesh, err := paMode(mode)
	if err != nil {
		return nil, err
	}
	objs := []Object{{
		APIVersion: SecurityAPIVersion, Kind: KindPeerAuthentication,
		Name: "default", Namespace: in.RootNamespace,
		Spec: &securityv1beta1.PeerAuthentication{Mtls: &securityv1beta1.PeerAuthentication_MutualTLS{Mode: mesh}},
	}}
	if !pol.Enabled {
		// Nothing is required, so there is nothing to except.
		return objs, nil
	}
	workloads := map[string]Workload{}
	for _, w := range in.Workloads {
		workloads[w.Service] = w
	}
	var errs []error
	for _, host := range pol.Excluded {
		t := classify(host, in.ClusterDomain)
		drNamespace := t.namespace
		if drNamespace == "" {
			drNamespace = in.RootNamespace
		}
		name, err := objectName(host)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		objs = append(objs, Object{
			APIVersion: NetworkingAPIVersion, Kind: KindDestinationRule,
			Name: name, Namespace: drNamespace,
			Spec: &networkingv1beta1.DestinationRule{
				Host: host,
				TrafficPolicy: &networkingv1beta1.TrafficPolicy{
					Tls: &networkingv1beta1.ClientTLSSettings{Mode: networkingv1beta1.ClientTLSSettings_DISABLE},
				},
			},
		})
		w, ok := workloads[host]
		if !ok {
			continue
		}
		pa, err := workloadPolicy(t, w, in.RootNamespace)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		objs = append(objs, Object{
			APIVersion: SecurityAPIVersion, Kind: KindPeerAuthentication,
			Name: name, Namespace: t.namespace, Spec: pa,
		})
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("istiorender: %w", err)
	}
	return objs, nil
}

// normalize validates in and fills in its defaults; workload names come
// back normalized as the policy's are.
func (in Input) normalize() (Input, error) {
	var errs []error
	pol, err := in.Policy.Normalize()
	if err != nil {
		errs = append(errs, err)
	}
	in.Policy = pol
	if in.RootNamespace == "" {
		in.RootNamespace = DefaultRootNamespace
	}
	for _, msg := range validation.IsDNS1123Label(in.RootNamespace) {
		errs = append(errs, fmt.Errorf("root namespace %q: %s", in.RootNamespace, msg))
	}
	if in.ClusterDomain == "" {
		in.ClusterDomain = DefaultClusterDomain
	}
	if in.ClusterDomain, err = policy.NormalizeFQDN(in.ClusterDomain); err != nil {
		errs = append(errs, fmt.Errorf("cluster domain: %w", err))
	}
	ws := make([]Workload, 0, len(in.Workloads))
	seen := map[string]bool{}
	for _, w := range in.Workloads {
		// Normalize it as the policy does, through a policy of one name.
		n, err := policy.Policy{Excluded: []string{w.Service}}.Normalize()
		if err != nil {
			errs = append(errs, fmt.Errorf("workload: %w", err))
			continue
		}
		w.Service = n.Excluded[0]
		switch {
		case seen[w.Service]:
			errs = append(errs, fmt.Errorf("workload %s is declared twice", w.Service))
		case !slices.Contains(pol.Excluded, w.Service):
			errs = append(errs, fmt.Errorf("workload %s is not excluded by the policy", w.Service))
		}
		seen[w.Service] = true
		for _, k := range slices.Sorted(maps.Keys(w.Selector)) {
			for _, msg := range validation.IsQualifiedName(k) {
				errs = append(errs, fmt.Errorf("workload %s: label key %q: %s", w.Service, k, msg))
			}
			for _, msg := range validation.IsValidLabelValue(w.Selector[k]) {
				errs = append(errs, fmt.Errorf("workload %s: label %s value %q: %s", w.Service, k, w.Selector[k], msg))
			}
		}
		for _, p := range w.Ports {
			if p == 0 || p > 65535 {
				errs = append(errs, fmt.Errorf("workload %s: port %d out of range", w.Service, p))
			}
		}
		ws = append(ws, w)
	}
	in.Workloads = ws
	if err := errors.Join(errs...); err != nil {
		return Input{}, fmt.Errorf("istiorender: %w", err)
	}
	return in, nil
}

// target is what an excluded name designates in this cluster.
type target struct {
	namespace string // of the service or namespace; "" when neither
	service   bool   // an exact service, rather than a whole namespace
}

// classify places a normalized excluded name: a service
// "<name>.<ns>.svc.<domain>", a namespace "*.<ns>.svc.<domain>", or
// anything else (no namespace).
func classify(host, domain string) target {
	var t target
	rest, wild := strings.CutPrefix(host, "*.")
	local, ok := strings.CutSuffix(rest, ".svc."+domain)
	if !ok {
		return t
	}
	labels := strings.Split(local, ".")
	switch {
	case wild && len(labels) == 1:
		t.namespace = labels[0]
	case !wild && len(labels) == 2:
		t.namespace, t.service = labels[1], true
	}
	return t
}

func workloadPolicy(t target, w Workload, root string) (*securityv1beta1.PeerAuthentication, error) {
	switch {
	case t.namespace == "":
		return nil, fmt.Errorf("workload %s: not a service or namespace of this cluster, so no PeerAuthentication can select its pods", w.Service)
	case t.namespace == root:
		return nil, fmt.Errorf("workload %s: in the root namespace %s, where Istio ignores workload selectors", w.Service, root)
	case t.service && len(w.Selector) == 0:
		return nil, fmt.Errorf("workload %s: a service needs the labels of its pods", w.Service)
	case len(w.Ports) > 0 && len(w.Selector) == 0:
		return nil, fmt.Errorf("workload %s: port-level settings need a selector", w.Service)
	}
	pa := &securityv1beta1.PeerAuthentication{}
	if len(w.Selector) > 0 {
		pa.Selector = &typev1beta1.WorkloadSelector{MatchLabels: maps.Clone(w.Selector)}
	}
	disable := &securityv1beta1.PeerAuthentication_MutualTLS{Mode: securityv1beta1.PeerAuthentication_MutualTLS_DISABLE}
	if len(w.Ports) == 0 {
		pa.Mtls = disable
		return pa, nil
	}
	pa.PortLevelMtls = map[uint32]*securityv1beta1.PeerAuthentication_MutualTLS{}
	for _, p := range w.Ports {
		pa.PortLevelMtls[p] = disable
	}
	return pa, nil
}

func paMode(m policy.Mode) (securityv1beta1.PeerAuthentication_MutualTLS_Mode, error) {
	switch m {
	case policy.ModeStrict:
		return securityv1beta1.PeerAuthentication_MutualTLS_STRICT, nil
	case policy.ModePermissive:
		return securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE, nil
	case policy.ModeDisable:
		return securityv1beta1.PeerAuthentication_MutualTLS_DISABLE, nil
	}
	return 0, fmt.Errorf("istiorender: mode %q", m)
}

// objectName names the objects of an excluded host: a DNS subdomain, the
// wildcard spelled out, shortened with a hash when too long.
func objectName(host string) (string, error) {
	name := namePrefix + strings.ReplaceAll(host, "*", "wildcard")
	if len(name) > validation.DNS1123SubdomainMaxLength {
		sum := sha256.Sum256([]byte(host))
		suffix := "-" + hex.EncodeToString(sum[:4])
		name = strings.TrimRight(name[:validation.DNS1123SubdomainMaxLength-len(suffix)], ".-") + suffix
	}
	if msgs := validation.IsDNS1123Subdomain(name); len(msgs) > 0 {
		return "", fmt.Errorf("object name %q for %s: %s", name, host, strings.Join(msgs, "; "))
	}
	return name, nil
}

// Marshal returns objs as multi-document YAML, keys sorted.
func Marshal(objs []Object) ([]byte, error) {
	var out bytes.Buffer
	for i, o := range objs {
		spec, err := specMap(o.Spec)
		if err != nil {
			return nil, fmt.Errorf("istiorender: %s %s/%s: %w", o.Kind, o.Namespace, o.Name, err)
		}
		doc := map[string]any{
			"apiVersion": o.APIVersion,
			"kind":       o.Kind,
			"metadata": map[string]any{
				"name":      o.Name,
				"namespace": o.Namespace,
				"labels":    map[string]string{ManagedByLabel: ManagedBy},
			},
			"spec": spec,
		}
		j, err := json.Marshal(doc)
		if err != nil {
			return nil, fmt.Errorf("istiorender: %w", err)
		}
		y, err := yaml.JSONToYAML(j)
		if err != nil {
			return nil, fmt.Errorf("istiorender: %w", err)
		}
		if i > 0 {
			out.WriteString("---\n")
		}
		out.Write(y)
	}
	return out.Bytes(), nil
}

// specMap is m as Kubernetes spells it (protojson's camelCase), with the
// zero value of every enum in a message that is present written out:
// protojson would drop it, and for these APIs the zero is a choice worth
// reading (ClientTLSSettings' DISABLE).
func specMap(m proto.Message) (map[string]any, error) {
	b, err := protojson.Marshal(m)
	if err != nil {
		return nil, err
	}
	out := map[string]any{}
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, err
	}
	explicitEnums(m.ProtoReflect(), out)
	return out, nil
}

func explicitEnums(m protoreflect.Message, out map[string]any) {
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		switch {
		case fd.Kind() == protoreflect.EnumKind && !fd.IsList() && !fd.IsMap() && fd.ContainingOneof() == nil:
			if _, ok := out[fd.JSONName()]; !ok {
				out[fd.JSONName()] = string(fd.Enum().Values().ByNumber(m.Get(fd).Enum()).Name())
			}
		case fd.IsMap() && fd.MapValue().Message() != nil && m.Has(fd):
			sub, _ := out[fd.JSONName()].(map[string]any)
			m.Get(fd).Map().Range(func(k protoreflect.MapKey, v protoreflect.Value) bool {
				if child, ok := sub[k.String()].(map[string]any); ok {
					explicitEnums(v.Message(), child)
				}
				return true
			})
		case fd.IsList() && fd.Message() != nil && m.Has(fd):
			items, _ := out[fd.JSONName()].([]any)
			l := m.Get(fd).List()
			for j := range min(l.Len(), len(items)) {
				if child, ok := items[j].(map[string]any); ok {
					explicitEnums(l.Get(j).Message(), child)
				}
			}
		case fd.Message() != nil && !fd.IsList() && !fd.IsMap() && m.Has(fd):
			if child, ok := out[fd.JSONName()].(map[string]any); ok {
				explicitEnums(m.Get(fd).Message(), child)
			}
		}
	}
}
