package policy

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// Service is one service of the mesh as Plan sees it.
type Service struct {
	FQDN      string     `json:"fqdn"`
	Endpoints []Endpoint `json:"endpoints,omitempty"`
}

// Endpoint is one address serving a Service. Pod is empty for an address
// no pod backs (a hand-written EndpointSlice, an external IP).
type Endpoint struct {
	Namespace string `json:"namespace,omitempty"`
	Pod       string `json:"pod,omitempty"`
	Addr      string `json:"addr"`
}

func (e Endpoint) String() string {
	if e.Pod == "" {
		return e.Addr
	}
	return e.Namespace + "/" + e.Pod + " " + e.Addr
}

// Finding names a service that a policy would cut off: it requires mTLS,
// and some endpoints have no proxy to terminate it.
type Finding struct {
	Service string `json:"service"` // normalized FQDN, or as given if it does not normalize
	Mode    Mode   `json:"mode"`
	// Endpoints is how many endpoints the service has.
	Endpoints int `json:"endpoints"`
	// Unproxied are the endpoints without a proxy holding a certificate.
	Unproxied []Endpoint `json:"unproxied"`
}

// All reports whether no endpoint of the service would be reachable.
func (f Finding) All() bool { return len(f.Unproxied) == f.Endpoints }

func (f Finding) String() string {
	names := make([]string, len(f.Unproxied))
	for i, e := range f.Unproxied {
		names[i] = e.String()
	}
	return fmt.Sprintf("%s: %s would refuse plaintext, but %d of %d endpoints have no proxy (%s)",
		f.Service, f.Mode, len(f.Unproxied), f.Endpoints, strings.Join(names, ", "))
}

// Plan lists the services that p would break, sorted by name: those whose
// mode under p is STRICT and which have an endpoint for which hasProxy is
// false. Services without endpoints break nothing and are left out. To
// preview turning STRICT on, pass the proposed policy, not the current one.
func Plan(p Policy, services []Service, hasProxy func(Endpoint) bool) []Finding {
	var out []Finding
	for _, s := range services {
		mode := p.ModeFor(s.FQDN)
		if mode != ModeStrict || len(s.Endpoints) == 0 {
			continue
		}
		var bad []Endpoint
		for _, e := range s.Endpoints {
			if !hasProxy(e) {
				bad = append(bad, e)
			}
		}
		if len(bad) == 0 {
			continue
		}
		name, err := NormalizeFQDN(s.FQDN)
		if err != nil {
			name = s.FQDN
		}
		out = append(out, Finding{Service: name, Mode: mode, Endpoints: len(s.Endpoints), Unproxied: bad})
	}
	slices.SortStableFunc(out, func(a, b Finding) int { return cmp.Compare(a.Service, b.Service) })
	return out
}
