package kubestore

import (
	"cmp"
	"context"
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/pager"

	"github.com/meshca/meshca/internal/policy"
)

// InventoryConfig configures an Inventory.
type InventoryConfig struct {
	Client kubernetes.Interface
	// Namespace limits the listing to one namespace; "" lists them all.
	Namespace string
	// ClusterDomain ends every service's FQDN (default cluster.local).
	ClusterDomain string
}

// Inventory lists the cluster's services and their endpoints for
// policy.Plan. It lists on demand rather than watching: a plan is asked for
// now and then, and an informer over every EndpointSlice would hold the
// whole cluster's endpoints in memory all the time to answer it.
type Inventory struct {
	cfg InventoryConfig
}

// NewInventory validates cfg. It makes no API call.
func NewInventory(cfg InventoryConfig) (*Inventory, error) {
	if cfg.Client == nil {
		return nil, fmt.Errorf("kubestore: inventory needs a client")
	}
	if cfg.ClusterDomain == "" {
		cfg.ClusterDomain = "cluster.local"
	}
	if _, err := policy.NormalizeFQDN("svc." + cfg.ClusterDomain); err != nil {
		return nil, fmt.Errorf("kubestore: cluster domain: %w", err)
	}
	return &Inventory{cfg: cfg}, nil
}

// Services returns every Service as <name>.<namespace>.svc.<cluster
// domain>, sorted, with the endpoints of its EndpointSlices. Terminating
// endpoints are left out: they are on their way out whatever the policy.
// Endpoints not yet ready are kept, since they will receive traffic soon.
func (inv *Inventory) Services(ctx context.Context) ([]policy.Service, error) {
	byKey := make(map[string]*policy.Service)
	var order []*policy.Service
	core := inv.cfg.Client.CoreV1().Services(inv.cfg.Namespace)
	err := pager.New(pager.SimplePageFunc(func(o metav1.ListOptions) (runtime.Object, error) {
		return core.List(ctx, o)
	})).EachListItem(ctx, metav1.ListOptions{}, func(obj runtime.Object) error {
		svc := obj.(*corev1.Service)
		s := &policy.Service{FQDN: svc.Name + "." + svc.Namespace + ".svc." + inv.cfg.ClusterDomain}
		byKey[svc.Namespace+"/"+svc.Name] = s
		order = append(order, s)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("kubestore: listing services: %w", err)
	}

	seen := make(map[string]map[policy.Endpoint]bool)
	disc := inv.cfg.Client.DiscoveryV1().EndpointSlices(inv.cfg.Namespace)
	err = pager.New(pager.SimplePageFunc(func(o metav1.ListOptions) (runtime.Object, error) {
		return disc.List(ctx, o)
	})).EachListItem(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName}, func(obj runtime.Object) error {
		slice := obj.(*discoveryv1.EndpointSlice)
		key := slice.Namespace + "/" + slice.Labels[discoveryv1.LabelServiceName]
		s, ok := byKey[key]
		if !ok {
			return nil // the slice outlived its service
		}
		if seen[key] == nil {
			seen[key] = make(map[policy.Endpoint]bool)
		}
		for _, ep := range slice.Endpoints {
			if ep.Conditions.Terminating != nil && *ep.Conditions.Terminating {
				continue
			}
			pod := ""
			if r := ep.TargetRef; r != nil && r.Kind == "Pod" {
				pod = r.Name
			}
			for _, addr := range ep.Addresses {
				e := policy.Endpoint{Namespace: slice.Namespace, Pod: pod, Addr: addr}
				// Slices overlap briefly while the controller moves
				// endpoints between them.
				if !seen[key][e] {
					seen[key][e] = true
					s.Endpoints = append(s.Endpoints, e)
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("kubestore: listing endpointslices: %w", err)
	}

	out := make([]policy.Service, len(order))
	for i, s := range order {
		slices.SortFunc(s.Endpoints, func(a, b policy.Endpoint) int {
			return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Pod, b.Pod), cmp.Compare(a.Addr, b.Addr))
		})
		out[i] = *s
	}
	slices.SortFunc(out, func(a, b policy.Service) int { return cmp.Compare(a.FQDN, b.FQDN) })
	return out, nil
}
