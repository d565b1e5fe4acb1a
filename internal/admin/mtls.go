package admin

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/istiorender"
	"github.com/meshca/meshca/sds"
)

// MTLSStore is the mesh mTLS policy the API reads and edits: a
// policy.Store.
type MTLSStore interface {
	Current() (policy.Policy, policy.Revision)
	Update(ctx context.Context, mutate func(policy.Policy) (policy.Policy, error)) (policy.Policy, error)
	Synced() bool
	Status() policy.Status
}

// Inventory lists the mesh's services and their endpoints, for plans:
// *kubestore.Inventory.
type Inventory interface {
	Services(ctx context.Context) ([]policy.Service, error)
}

// Proxies is one look at the proxies a plan counts on.
type Proxies struct {
	// Has reports whether an endpoint has a proxy that terminates mTLS.
	Has func(policy.Endpoint) bool
	// Seen is how many proxies were looked at.
	Seen int
	// Basis says, for the reader of a plan, how Has decides and what it
	// cannot see.
	Basis string
}

// MTLSConfig configures MTLSRoutes.
type MTLSConfig struct {
	Store MTLSStore
	// StoreName says where the policy is kept ("configmap ns/name",
	// "file /path"), for status.
	StoreName string
	// Inventory lists the services a plan looks at; nil refuses plans,
	// saying NoInventory.
	Inventory   Inventory
	NoInventory string
	// Proxies looks at the proxies when a plan is made; nil knows of none,
	// so every endpoint counts as unproxied.
	Proxies func(ctx context.Context) (Proxies, error)
	// ClusterDomain is the cluster's DNS domain, the default of render's
	// (cluster.local when empty).
	ClusterDomain string
}

// MTLSStatus is the answer of GET /v1/mtls.
type MTLSStatus struct {
	Policy   policy.Policy   `json:"policy"`
	Revision policy.Revision `json:"revision,omitempty"`
	// Mode is what services that are not excluded accept: DISABLE while
	// mTLS is off.
	Mode     policy.Mode `json:"mode"`
	Excluded []string    `json:"excluded"`
	// Store says where the policy is kept.
	Store string `json:"store"`
	// Synced is false until the store has read its backing object once;
	// until then Policy is the default, not what is stored.
	Synced bool `json:"synced"`
	// Error, when set, is why the newest stored version (ErrorRevision)
	// is not in force: Policy is the last good one.
	Error         string          `json:"error,omitempty"`
	ErrorRevision policy.Revision `json:"errorRevision,omitempty"`
}

// MTLSChange is the answer of a change: the policy the change was applied
// to and the policy stored.
type MTLSChange struct {
	Before  policy.Policy `json:"before"`
	After   policy.Policy `json:"after"`
	Changed bool          `json:"changed"`
}

// MTLSEnableRequest is the body of POST /v1/mtls/enable.
type MTLSEnableRequest struct {
	// Mode is STRICT or PERMISSIVE (any case); empty keeps the stored
	// mode, which is STRICT unless set.
	Mode policy.Mode `json:"mode,omitempty"`
}

// MTLSNamesRequest is the body of POST /v1/mtls/exclusions/{add,remove}.
type MTLSNamesRequest struct {
	// Names are service FQDNs, or "*.<suffix>" patterns.
	Names []string `json:"names"`
}

// MTLSPlan is the answer of GET /v1/mtls/plan: what the proposed policy
// would cut off.
type MTLSPlan struct {
	Current  policy.Policy   `json:"current"`
	Revision policy.Revision `json:"revision,omitempty"`
	// Proposed is the policy planned: Current switched on in STRICT mode,
	// the only mode that refuses plaintext, with the extra exclusions
	// asked for.
	Proposed  policy.Policy `json:"proposed"`
	Services  int           `json:"services"`
	Endpoints int           `json:"endpoints"`
	// Proxies is how many proxies were looked at; ProxyBasis how an
	// endpoint is found to have one, and what cannot be seen.
	Proxies    int              `json:"proxies"`
	ProxyBasis string           `json:"proxyBasis"`
	Findings   []policy.Finding `json:"findings"`
}

// MTLSRender is the answer of GET /v1/mtls/render.
type MTLSRender struct {
	Revision policy.Revision `json:"revision,omitempty"`
	// YAML holds Istio's PeerAuthentication and DestinationRule objects.
	YAML string `json:"yaml"`
}

// MTLSRoutes serves the mesh mTLS policy:
//
//	GET  /v1/mtls                          MTLSStatus
//	POST /v1/mtls/enable                   body MTLSEnableRequest; MTLSChange
//	POST /v1/mtls/disable                  MTLSChange
//	POST /v1/mtls/exclusions/add           body MTLSNamesRequest; MTLSChange
//	POST /v1/mtls/exclusions/remove        body MTLSNamesRequest; MTLSChange
//	GET  /v1/mtls/plan?exclude=NAME...     MTLSPlan
//	GET  /v1/mtls/render?rootNamespace=NS&clusterDomain=D&sidecar=NAME[=k=v,...]...
//	                                       MTLSRender
//
// A change is validated as a whole before anything is stored: one invalid
// name refuses the request (400) and stores nothing. Concurrent changes
// are merged by the store, never lost. A store that cannot be reached is
// 503; a stored policy that does not parse is 409 until fixed by hand.
func MTLSRoutes(cfg MTLSConfig) []Route {
	h := mtlsHandlers{cfg: cfg}
	get := func(path, target string, fn Handler) Route {
		return Route{Method: http.MethodGet, Path: path, Action: GetMTLS, Target: target, Handler: fn}
	}
	post := func(path, target string, fn Handler) Route {
		return Route{Method: http.MethodPost, Path: path, Action: UpdateMTLS, Mutates: true, Target: target, Handler: fn}
	}
	return []Route{
		get("/v1/mtls", "mtls", h.status),
		post("/v1/mtls/enable", "mtls/enable", h.enable),
		post("/v1/mtls/disable", "mtls/disable", h.disable),
		post("/v1/mtls/exclusions/add", "mtls/exclusions/add", h.exclusions(true)),
		post("/v1/mtls/exclusions/remove", "mtls/exclusions/remove", h.exclusions(false)),
		get("/v1/mtls/plan", "mtls/plan", h.plan),
		get("/v1/mtls/render", "mtls/render", h.render),
	}
}

type mtlsHandlers struct{ cfg MTLSConfig }

func (h mtlsHandlers) status(context.Context, *http.Request) (any, error) {
	p, rev := h.cfg.Store.Current()
	st := h.cfg.Store.Status()
	out := MTLSStatus{
		Policy: p, Revision: rev, Mode: policy.ModeDisable, Excluded: p.Excluded,
		Store: h.cfg.StoreName, Synced: h.cfg.Store.Synced(),
	}
	if p.Enabled {
		out.Mode = p.EffectiveMode()
	}
	if out.Excluded == nil {
		out.Excluded = []string{}
	}
	if st.Err != nil {
		out.Error, out.ErrorRevision = st.Err.Error(), st.ErrRevision
	}
	return out, nil
}

func (h mtlsHandlers) enable(ctx context.Context, r *http.Request) (any, error) {
	var req MTLSEnableRequest
	if err := DecodeBody(r, &req); err != nil {
		return nil, err
	}
	if req.Mode != "" {
		// Check the mode alone first, so the error names it and nothing else.
		if _, err := (policy.Policy{Mode: req.Mode}).Normalize(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
		}
	}
	return h.change(ctx, func(p policy.Policy) (policy.Policy, error) {
		p.Enabled = true
		if req.Mode != "" {
			p.Mode = req.Mode
		}
		return p, nil
	})
}

func (h mtlsHandlers) disable(ctx context.Context, r *http.Request) (any, error) {
	var req struct{}
	if err := DecodeBody(r, &req); err != nil {
		return nil, err
	}
	return h.change(ctx, func(p policy.Policy) (policy.Policy, error) {
		p.Enabled = false
		return p, nil
	})
}

func (h mtlsHandlers) exclusions(add bool) Handler {
	return func(ctx context.Context, r *http.Request) (any, error) {
		var req MTLSNamesRequest
		if err := DecodeBody(r, &req); err != nil {
			return nil, err
		}
		names, err := normalizeNames(req.Names)
		if err != nil {
			return nil, err
		}
		return h.change(ctx, func(p policy.Policy) (policy.Policy, error) {
			if add {
				p.Excluded = append(p.Excluded, names...)
				return p, nil
			}
			var missing []string
			for _, n := range names {
				if !slices.Contains(p.Excluded, n) {
					missing = append(missing, n)
				}
			}
			if len(missing) > 0 {
				// A typo must not pass for a removal: refuse the whole request.
				return p, fmt.Errorf("%w: not excluded, so nothing was removed: %s (excluded: %s)",
					ErrConflict, strings.Join(missing, ", "), listOrNone(p.Excluded))
			}
			p.Excluded = slices.DeleteFunc(p.Excluded, func(e string) bool { return slices.Contains(names, e) })
			return p, nil
		})
	}
}

// normalizeNames validates and normalizes excluded names as the policy
// will store them, reporting every bad one.
func normalizeNames(names []string) ([]string, error) {
	if len(names) == 0 {
		return nil, fmt.Errorf("%w: no names given", ErrInvalid)
	}
	n, err := policy.Policy{Excluded: names}.Normalize()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return n.Excluded, nil
}

// change applies mutate through the store and reports the policy it was
// applied to, as the store's last (successful) call of mutate saw it.
func (h mtlsHandlers) change(ctx context.Context, mutate func(policy.Policy) (policy.Policy, error)) (any, error) {
	var before policy.Policy
	after, err := h.cfg.Store.Update(ctx, func(p policy.Policy) (policy.Policy, error) {
		before = p
		// Hand mutate its own copy: before must stay as read.
		p.Excluded = slices.Clone(p.Excluded)
		return mutate(p)
	})
	if err != nil {
		return nil, storeErr(err)
	}
	return MTLSChange{Before: before, After: after, Changed: !before.Equal(after)}, nil
}

// storeErr maps the errors of a store update to API errors.
func storeErr(err error) error {
	switch {
	case errors.Is(err, ErrInvalid), errors.Is(err, ErrConflict), errors.Is(err, ErrUnavailable):
		return err
	case errors.Is(err, policy.ErrMalformed):
		// The request may be fine; the stored object is not.
		return fmt.Errorf("%w: %w", ErrConflict, err)
	case errors.Is(err, policy.ErrInvalid):
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	default:
		return fmt.Errorf("%w: the policy store: %w", ErrUnavailable, err)
	}
}

func (h mtlsHandlers) plan(ctx context.Context, r *http.Request) (any, error) {
	if h.cfg.Inventory == nil {
		why := h.cfg.NoInventory
		if why == "" {
			why = "this server has no inventory of services"
		}
		return nil, fmt.Errorf("%w: cannot plan: %s", ErrConflict, why)
	}
	cur, rev := h.cfg.Store.Current()
	proposed := cur
	proposed.Enabled, proposed.Mode = true, policy.ModeStrict
	// Normalize checks the extra names along with the rest.
	if extra := r.URL.Query()["exclude"]; len(extra) > 0 {
		proposed.Excluded = append(slices.Clone(cur.Excluded), extra...)
	}
	proposed, err := proposed.Normalize()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	services, err := h.cfg.Inventory.Services(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: listing services: %w", ErrUnavailable, err)
	}
	px := Proxies{Has: func(policy.Endpoint) bool { return false }, Basis: "this server knows of no proxies: every endpoint counts as unproxied"}
	if h.cfg.Proxies != nil {
		if px, err = h.cfg.Proxies(ctx); err != nil {
			return nil, fmt.Errorf("%w: looking at the proxies: %w", ErrUnavailable, err)
		}
	}
	out := MTLSPlan{
		Current: cur, Revision: rev, Proposed: proposed, Services: len(services),
		Proxies: px.Seen, ProxyBasis: px.Basis, Findings: policy.Plan(proposed, services, px.Has),
	}
	for _, s := range services {
		out.Endpoints += len(s.Endpoints)
	}
	if out.Findings == nil {
		out.Findings = []policy.Finding{}
	}
	return out, nil
}

func (h mtlsHandlers) render(_ context.Context, r *http.Request) (any, error) {
	q := r.URL.Query()
	p, rev := h.cfg.Store.Current()
	in := istiorender.Input{Policy: p, RootNamespace: q.Get("rootNamespace"), ClusterDomain: q.Get("clusterDomain")}
	if in.ClusterDomain == "" {
		in.ClusterDomain = h.cfg.ClusterDomain
	}
	for _, s := range q["sidecar"] {
		w, err := parseSidecar(s)
		if err != nil {
			return nil, err
		}
		in.Workloads = append(in.Workloads, w)
	}
	y, err := istiorender.Render(in)
	if err != nil {
		// The stored policy is valid: what fails is what the caller asked.
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return MTLSRender{Revision: rev, YAML: string(y)}, nil
}

// parseSidecar reads an excluded name whose pods run sidecars, for
// render: "NAME" (a namespace pattern, every pod in it) or
// "NAME=KEY=VALUE,KEY=VALUE" (the labels of the service's pods). Such
// pods are told to accept plaintext on every port.
func parseSidecar(s string) (istiorender.Workload, error) {
	name, sel, hasSel := strings.Cut(s, "=")
	w := istiorender.Workload{Service: strings.TrimSpace(name)}
	if w.Service == "" {
		return w, fmt.Errorf("%w: sidecar %q: want NAME, or NAME=KEY=VALUE with more labels after commas", ErrInvalid, s)
	}
	if !hasSel {
		return w, nil
	}
	w.Selector = map[string]string{}
	for kv := range strings.SplitSeq(sel, ",") {
		k, v, ok := strings.Cut(kv, "=")
		k = strings.TrimSpace(k)
		if !ok || k == "" {
			return w, fmt.Errorf("%w: sidecar %q: label %q is not KEY=VALUE", ErrInvalid, s, kv)
		}
		w.Selector[k] = strings.TrimSpace(v)
	}
	return w, nil
}

// StreamLister lists the SDS streams connected to this server:
// *sds.Server.
type StreamLister interface {
	Status() []sds.StreamStatus
}

// ProxyBasis is how ConnectedProxies decides, in words.
const ProxyBasis = "an endpoint counts as having a proxy when a workload of its namespace holds an SDS stream " +
	"to this meshca server from the endpoint's IP address (a meshca agent, or Envoy on central SDS). " +
	"Not seen, so counted as unproxied: streams to other replicas, agents whose connections are NATed " +
	"or leave from the host network, and proxies that take certificates but keep no SDS stream to meshca " +
	"(Istio's own agent)"

// ConnectedProxies finds endpoints' proxies among the SDS streams
// connected to this server. A stream proves that a workload holding a
// valid token for its identity runs at the stream's address; matching the
// address alone could credit a proxy of another namespace that reuses an
// IP, and matching the identity alone (namespace, service account) cannot
// tell one pod of a deployment from another, so both must match. What it
// cannot see errs towards "no proxy": a plan may warn about an endpoint
// that is fine, never the other way round.
func ConnectedProxies(l StreamLister) func(context.Context) (Proxies, error) {
	type key struct {
		namespace string
		ip        netip.Addr
	}
	return func(context.Context) (Proxies, error) {
		seen := map[key]bool{}
		n := 0
		for _, st := range l.Status() {
			if st.Peer.ID.IsZero() {
				continue // unauthenticated: a local socket, not a workload
			}
			ns, _, ok := identity.WorkloadOf(st.Peer.ID)
			if !ok {
				continue
			}
			ap, err := netip.ParseAddrPort(st.Peer.Addr)
			if err != nil {
				continue
			}
			seen[key{ns, ap.Addr().Unmap().WithZone("")}] = true
			n++
		}
		has := func(e policy.Endpoint) bool {
			ip, err := netip.ParseAddr(e.Addr)
			return err == nil && seen[key{e.Namespace, ip.Unmap().WithZone("")}]
		}
		return Proxies{Has: has, Seen: n, Basis: ProxyBasis}, nil
	}
}

// PlanQuery is the query string of GET /v1/mtls/plan.
func PlanQuery(exclude []string) string {
	return encodeQuery(url.Values{"exclude": exclude})
}

// RenderQuery is the query string of GET /v1/mtls/render.
func RenderQuery(rootNamespace, clusterDomain string, sidecars []string) string {
	v := url.Values{"sidecar": sidecars}
	if rootNamespace != "" {
		v.Set("rootNamespace", rootNamespace)
	}
	if clusterDomain != "" {
		v.Set("clusterDomain", clusterDomain)
	}
	return encodeQuery(v)
}

func encodeQuery(v url.Values) string {
	for k, vs := range v {
		if len(vs) == 0 {
			delete(v, k)
		}
	}
	if len(v) == 0 {
		return ""
	}
	return "?" + v.Encode()
}

func listOrNone(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}
