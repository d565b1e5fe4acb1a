package admin_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

type mtlsEnv struct {
	path   string // the policy file
	store  *policy.FileStore
	ledger *audit.Ledger
	client *admin.Client
}

// startMTLS serves MTLSRoutes over a FileStore on a real Unix socket.
// cfg's Store and StoreName are filled in.
func startMTLS(t *testing.T, path string, cfg admin.MTLSConfig) *mtlsEnv {
	t.Helper()
	store, err := policy.NewFileStore(policy.FileConfig{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := store.Run(ctx); err != nil {
			t.Errorf("store Run: %v", err)
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
	if err := store.WaitForSync(ctx); err != nil {
		t.Fatal(err)
	}
	cfg.Store, cfg.StoreName = store, "file "+path
	e := serveMTLS(t, cfg)
	e.path, e.store = path, store
	return e
}

// serveMTLS serves MTLSRoutes over cfg.Store, which it does not run.
func serveMTLS(t *testing.T, cfg admin.MTLSConfig) *mtlsEnv {
	t.Helper()
	ledger, err := audit.New(audit.Config{Dir: filepath.Join(t.TempDir(), "audit")})
	if err != nil {
		t.Fatal(err)
	}
	socket := serveAdmin(t, ledger, admin.MTLSRoutes(cfg))
	return &mtlsEnv{ledger: ledger, client: admin.NewUnixClient(socket)}
}

func (e *mtlsEnv) do(t *testing.T, method, path string, in, out any) *admin.APIError {
	t.Helper()
	err := e.client.Do(context.Background(), method, path, in, out)
	var apiErr *admin.APIError
	if err != nil && !errors.As(err, &apiErr) {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return apiErr
}

func (e *mtlsEnv) change(t *testing.T, path string, in any) admin.MTLSChange {
	t.Helper()
	var ch admin.MTLSChange
	if err := e.do(t, http.MethodPost, path, in, &ch); err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	return ch
}

// stored is the policy in the file, as another process would read it.
func (e *mtlsEnv) stored(t *testing.T) policy.Policy {
	t.Helper()
	b, err := os.ReadFile(e.path)
	if err != nil {
		t.Fatal(err)
	}
	p, err := policy.ParseJSON(b)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestMTLSPolicyOverTheSocket(t *testing.T) {
	e := startMTLS(t, filepath.Join(t.TempDir(), "mtls-policy.json"), admin.MTLSConfig{})

	var st admin.MTLSStatus
	if err := e.do(t, http.MethodGet, "/v1/mtls", nil, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode != policy.ModeDisable || !st.Synced || st.Store != "file "+e.path ||
		!slices.Equal(st.Excluded, []string{policy.DefaultExcluded}) || st.Revision != "" {
		t.Fatalf("initial status: %+v", st)
	}

	ch := e.change(t, "/v1/mtls/enable", admin.MTLSEnableRequest{Mode: "permissive"})
	if !ch.Changed || ch.Before.Enabled || !ch.After.Enabled || ch.After.Mode != policy.ModePermissive {
		t.Fatalf("enable: %+v", ch)
	}
	if p := e.stored(t); !p.Enabled || p.Mode != policy.ModePermissive {
		t.Fatalf("file after enable: %v", p)
	}
	// Enabling again with no mode keeps the stored one and changes nothing.
	if ch := e.change(t, "/v1/mtls/enable", admin.MTLSEnableRequest{}); ch.Changed || ch.After.Mode != policy.ModePermissive {
		t.Errorf("second enable: %+v", ch)
	}

	ch = e.change(t, "/v1/mtls/exclusions/add", admin.MTLSNamesRequest{Names: []string{"Legacy.Shop.svc.cluster.local.", "*.kube-system.svc.cluster.local"}})
	want := []string{"*.kube-system.svc.cluster.local", policy.DefaultExcluded, "legacy.shop.svc.cluster.local"}
	if !ch.Changed || !slices.Equal(ch.After.Excluded, want) || !slices.Equal(e.stored(t).Excluded, want) {
		t.Fatalf("add: %+v; file %v", ch, e.stored(t))
	}
	ch = e.change(t, "/v1/mtls/exclusions/remove", admin.MTLSNamesRequest{Names: []string{"legacy.shop.svc.cluster.local"}})
	want = []string{"*.kube-system.svc.cluster.local", policy.DefaultExcluded}
	if !ch.Changed || !slices.Equal(e.stored(t).Excluded, want) {
		t.Fatalf("remove: %+v", ch)
	}

	// Removing a name that is not excluded (a typo) removes nothing, not
	// even the names that are.
	err := e.do(t, http.MethodPost, "/v1/mtls/exclusions/remove",
		admin.MTLSNamesRequest{Names: []string{"*.kube-system.svc.cluster.local", "legasy.shop.svc.cluster.local"}}, nil)
	if err == nil || err.HTTPStatus != http.StatusConflict || !strings.Contains(err.Body.Error, "not excluded, so nothing was removed: legasy.shop.svc.cluster.local") {
		t.Fatalf("removing a missing name: %v", err)
	}
	if !slices.Equal(e.stored(t).Excluded, want) {
		t.Fatalf("a refused removal changed the file: %v", e.stored(t))
	}

	ch = e.change(t, "/v1/mtls/disable", nil)
	if !ch.Changed || ch.After.Enabled || !slices.Equal(ch.After.Excluded, want) {
		t.Fatalf("disable: %+v", ch)
	}
	if err := e.do(t, http.MethodGet, "/v1/mtls", nil, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode != policy.ModeDisable || st.Policy.Mode != policy.ModePermissive || st.Revision == "" {
		t.Errorf("status after disable: %+v", st)
	}

	// Each change is recorded before and after; reads are not.
	recs := adminRecords(t, e.ledger)
	type rec struct{ target, result string }
	var got []rec
	for _, r := range recs {
		if r.Action != "mtlspolicies.update" || !strings.HasPrefix(r.Actor, "unix:uid=") {
			t.Errorf("record %+v", r)
		}
		got = append(got, rec{r.Target, r.Result})
	}
	wantRecs := []rec{
		{"mtls/enable", "started"}, {"mtls/enable", "ok"},
		{"mtls/enable", "started"}, {"mtls/enable", "ok"},
		{"mtls/exclusions/add", "started"}, {"mtls/exclusions/add", "ok"},
		{"mtls/exclusions/remove", "started"}, {"mtls/exclusions/remove", "ok"},
		{"mtls/exclusions/remove", "started"}, {"mtls/exclusions/remove", "failed"},
		{"mtls/disable", "started"}, {"mtls/disable", "ok"},
	}
	if !slices.Equal(got, wantRecs) {
		t.Fatalf("admin records %v, want %v", got, wantRecs)
	}
	// A "started" record holds the path and the body as sent, compacted; an
	// empty or absent body leaves just the path.
	for i, want := range map[int]string{
		0:  `/v1/mtls/enable {"mode":"permissive"}`,
		2:  "/v1/mtls/enable",
		4:  `/v1/mtls/exclusions/add {"names":["Legacy.Shop.svc.cluster.local.","*.kube-system.svc.cluster.local"]}`,
		10: "/v1/mtls/disable",
	} {
		if recs[i].Detail != want {
			t.Errorf("record %d (%s %s): detail %q, want %q", i, recs[i].Target, recs[i].Result, recs[i].Detail, want)
		}
	}
}

func TestMTLSInvalidRequestsStoreNothing(t *testing.T) {
	e := startMTLS(t, filepath.Join(t.TempDir(), "mtls-policy.json"), admin.MTLSConfig{})
	e.change(t, "/v1/mtls/enable", nil)
	before, err := os.ReadFile(e.path)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, path string
		body       any
		want       []string
	}{
		{"bad names", "/v1/mtls/exclusions/add", admin.MTLSNamesRequest{Names: []string{"fine.example", "bad_name.example", "-x.example"}},
			[]string{`"bad_name.example"`, `"-x.example"`}},
		{"no names", "/v1/mtls/exclusions/add", admin.MTLSNamesRequest{}, []string{"no names given"}},
		{"bad removal", "/v1/mtls/exclusions/remove", admin.MTLSNamesRequest{Names: []string{"a..example"}}, []string{`"a..example"`}},
		{"unknown mode", "/v1/mtls/enable", admin.MTLSEnableRequest{Mode: "MUTUAL"}, []string{`mode "MUTUAL"`}},
		{"disable as a mode", "/v1/mtls/enable", admin.MTLSEnableRequest{Mode: "disable"}, []string{"set enabled to false instead"}},
		{"misspelt field", "/v1/mtls/exclusions/add", map[string]any{"nmes": []string{"a.example"}}, []string{"nmes"}},
		{"body on disable", "/v1/mtls/disable", map[string]any{"mode": "STRICT"}, []string{"mode"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := e.do(t, http.MethodPost, tc.path, tc.body, nil)
			if err == nil || err.HTTPStatus != http.StatusBadRequest {
				t.Fatalf("got %v, want 400", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Body.Error, w) {
					t.Errorf("error %q does not say %s", err.Body.Error, w)
				}
			}
		})
	}
	if after, err := os.ReadFile(e.path); err != nil || string(after) != string(before) {
		t.Errorf("refused requests changed the file:\n%s\nwas\n%s", after, before)
	}
	recs := adminRecords(t, e.ledger)
	failed := 0
	for _, r := range recs {
		if r.Result == "failed" {
			failed++
		}
	}
	if failed != 7 {
		t.Errorf("%d failed changes recorded, want 7", failed)
	}
}

func TestMTLSStoreTrouble(t *testing.T) {
	t.Run("a malformed file is a conflict until fixed", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "mtls-policy.json")
		if err := os.WriteFile(path, []byte(`{"enabled": true, "excluded": ["x"]}`), 0o644); err != nil {
			t.Fatal(err)
		}
		// A store on a malformed file never syncs, so start it by hand.
		s, err := policy.NewFileStore(policy.FileConfig{Path: path})
		if err != nil {
			t.Fatal(err)
		}
		e := serveMTLS(t, admin.MTLSConfig{Store: s})
		err2 := e.do(t, http.MethodPost, "/v1/mtls/exclusions/add", admin.MTLSNamesRequest{Names: []string{"a.example"}}, nil)
		if err2 == nil || err2.HTTPStatus != http.StatusConflict || !strings.Contains(err2.Body.Error, "malformed") {
			t.Fatalf("change over a malformed file: %v", err2)
		}
	})
	t.Run("an unwritable store is unavailable", func(t *testing.T) {
		// The policy's directory cannot be created: a file is in the way.
		blocker := filepath.Join(t.TempDir(), "blocker")
		if err := os.WriteFile(blocker, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		s, err := policy.NewFileStore(policy.FileConfig{Path: filepath.Join(blocker, "mtls-policy.json")})
		if err != nil {
			t.Fatal(err)
		}
		e := serveMTLS(t, admin.MTLSConfig{Store: s})
		err2 := e.do(t, http.MethodPost, "/v1/mtls/enable", nil, nil)
		if err2 == nil || err2.HTTPStatus != http.StatusServiceUnavailable || !strings.Contains(err2.Body.Error, "not a directory") {
			t.Fatalf("enable with an unwritable store: %v", err2)
		}
		var st admin.MTLSStatus
		if err := e.do(t, http.MethodGet, "/v1/mtls", nil, &st); err != nil {
			t.Fatal(err)
		}
		if st.Mode != policy.ModeDisable {
			t.Errorf("a failed enable shows as %s", st.Mode)
		}
	})
}

type fakeInventory struct {
	services []policy.Service
	err      error
}

func (f fakeInventory) Services(context.Context) ([]policy.Service, error) { return f.services, f.err }

func TestMTLSPlan(t *testing.T) {
	inv := fakeInventory{services: []policy.Service{
		{FQDN: "web.shop.svc.cluster.local", Endpoints: []policy.Endpoint{
			{Namespace: "shop", Pod: "web-1", Addr: "10.0.0.1"}, {Namespace: "shop", Pod: "web-2", Addr: "10.0.0.2"}}},
		{FQDN: "legacy.shop.svc.cluster.local", Endpoints: []policy.Endpoint{{Namespace: "shop", Addr: "192.0.2.9"}}},
		{FQDN: "idle.shop.svc.cluster.local"},
		{FQDN: policy.DefaultExcluded, Endpoints: []policy.Endpoint{{Namespace: "default", Addr: "10.9.0.1"}}},
	}}
	proxies := func(context.Context) (admin.Proxies, error) {
		return admin.Proxies{Has: func(e policy.Endpoint) bool { return e.Pod == "web-1" }, Seen: 1, Basis: "only web-1"}, nil
	}
	e := startMTLS(t, filepath.Join(t.TempDir(), "p.json"), admin.MTLSConfig{Inventory: inv, Proxies: proxies})

	// mTLS is off: the plan previews STRICT with today's exclusions.
	var plan admin.MTLSPlan
	if err := e.do(t, http.MethodGet, "/v1/mtls/plan", nil, &plan); err != nil {
		t.Fatal(err)
	}
	if plan.Current.Enabled || !plan.Proposed.Enabled || plan.Proposed.Mode != policy.ModeStrict ||
		plan.Services != 4 || plan.Endpoints != 4 || plan.Proxies != 1 || plan.ProxyBasis != "only web-1" {
		t.Errorf("plan: %+v", plan)
	}
	var names []string
	for _, f := range plan.Findings {
		names = append(names, f.Service)
	}
	if want := []string{"legacy.shop.svc.cluster.local", "web.shop.svc.cluster.local"}; !slices.Equal(names, want) {
		t.Fatalf("plan names %q, want %q", names, want)
	}
	if w := plan.Findings[1]; w.Endpoints != 2 || !slices.Equal(w.Unproxied, []policy.Endpoint{{Namespace: "shop", Pod: "web-2", Addr: "10.0.0.2"}}) {
		t.Errorf("web finding: %+v", w)
	}

	// Previewing an exclusion stores nothing.
	if err := e.do(t, http.MethodGet, "/v1/mtls/plan"+admin.PlanQuery([]string{"Legacy.shop.svc.cluster.local"}), nil, &plan); err != nil {
		t.Fatal(err)
	}
	if len(plan.Findings) != 1 || plan.Findings[0].Service != "web.shop.svc.cluster.local" {
		t.Errorf("plan excluding legacy: %+v", plan.Findings)
	}
	if _, err := os.Stat(e.path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a plan wrote the policy file: %v", err)
	}
	if err := e.do(t, http.MethodGet, "/v1/mtls/plan"+admin.PlanQuery([]string{"ok.example", "bad name"}), nil, nil); err == nil ||
		err.HTTPStatus != http.StatusBadRequest || !strings.Contains(err.Body.Error, `"bad name"`) || strings.Contains(err.Body.Error, "ok.example") {
		t.Errorf("plan with a bad name: %v", err)
	}
	if n := len(adminRecords(t, e.ledger)); n != 0 {
		t.Errorf("plans wrote %d admin records", n)
	}

	t.Run("no inventory", func(t *testing.T) {
		e := startMTLS(t, filepath.Join(t.TempDir(), "p.json"), admin.MTLSConfig{NoInventory: "no cluster here"})
		err := e.do(t, http.MethodGet, "/v1/mtls/plan", nil, nil)
		if err == nil || err.HTTPStatus != http.StatusConflict || !strings.Contains(err.Body.Error, "cannot plan: no cluster here") {
			t.Errorf("plan without an inventory: %v", err)
		}
	})
	t.Run("inventory down", func(t *testing.T) {
		e := startMTLS(t, filepath.Join(t.TempDir(), "p.json"), admin.MTLSConfig{Inventory: fakeInventory{err: errors.New("connection refused")}})
		err := e.do(t, http.MethodGet, "/v1/mtls/plan", nil, nil)
		if err == nil || err.HTTPStatus != http.StatusServiceUnavailable || !strings.Contains(err.Body.Error, "connection refused") {
			t.Errorf("plan with the inventory down: %v", err)
		}
	})
}

func TestMTLSRender(t *testing.T) {
	e := startMTLS(t, filepath.Join(t.TempDir(), "p.json"), admin.MTLSConfig{ClusterDomain: "corp.internal"})
	var r admin.MTLSRender
	if err := e.do(t, http.MethodGet, "/v1/mtls/render", nil, &r); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.YAML, "kind: PeerAuthentication") || !strings.Contains(r.YAML, "mode: DISABLE") || strings.Contains(r.YAML, "DestinationRule") {
		t.Errorf("render while off:\n%s", r.YAML)
	}

	e.change(t, "/v1/mtls/enable", nil)
	e.change(t, "/v1/mtls/exclusions/add", admin.MTLSNamesRequest{Names: []string{"legacy.pay.svc.corp.internal"}})
	q := admin.RenderQuery("mesh-root", "", []string{"legacy.pay.svc.corp.internal=app=legacy,version=v1"})
	if err := e.do(t, http.MethodGet, "/v1/mtls/render"+q, nil, &r); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"namespace: mesh-root", "mode: STRICT",
		"kind: DestinationRule", "host: legacy.pay.svc.corp.internal", "namespace: pay",
		"app: legacy", "version: v1",
	} {
		if !strings.Contains(r.YAML, want) {
			t.Errorf("render does not say %q:\n%s", want, r.YAML)
		}
	}
	if _, rev := e.store.Current(); r.Revision != rev || rev == "" {
		t.Errorf("render revision %q, store's %q", r.Revision, rev)
	}
	for _, bad := range []string{
		admin.RenderQuery("", "", []string{"web.shop.svc.corp.internal=app=web"}), // not excluded
		admin.RenderQuery("", "", []string{"legacy.pay.svc.corp.internal=app"}),   // not KEY=VALUE
		admin.RenderQuery("Not_A_Namespace", "", nil),
	} {
		if err := e.do(t, http.MethodGet, "/v1/mtls/render"+bad, nil, nil); err == nil || err.HTTPStatus != http.StatusBadRequest {
			t.Errorf("render%s: %v, want 400", bad, err)
		}
	}
}

type streams []sds.StreamStatus

func (s streams) Status() []sds.StreamStatus { return s }

func TestConnectedProxies(t *testing.T) {
	id := func(s string) spiffeid.ID { return spiffeid.RequireFromString(s) }
	web := id("spiffe://cluster.local/ns/shop/sa/web")
	l := streams{
		{Peer: sds.Peer{ID: web, Addr: "10.0.0.1:41000"}},
		{Peer: sds.Peer{ID: web, Addr: "[::ffff:10.0.0.2]:41000"}},
		{Peer: sds.Peer{ID: web, Addr: "[fd00::7]:41000"}},
		{Peer: sds.Peer{Addr: "10.0.0.3:41000"}},                                   // unauthenticated
		{Peer: sds.Peer{ID: id("spiffe://cluster.local/odd"), Addr: "10.0.0.4:1"}}, // not a workload ID
		{Peer: sds.Peer{ID: web, Addr: "@"}},                                       // a Unix socket
	}
	px, err := admin.ConnectedProxies(l)(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if px.Seen != 3 || px.Basis != admin.ProxyBasis {
		t.Errorf("Seen %d, Basis %q", px.Seen, px.Basis)
	}
	for _, tc := range []struct {
		e    policy.Endpoint
		want bool
	}{
		{policy.Endpoint{Namespace: "shop", Pod: "web-1", Addr: "10.0.0.1"}, true},
		{policy.Endpoint{Namespace: "shop", Addr: "10.0.0.2"}, true},
		{policy.Endpoint{Namespace: "shop", Addr: "fd00:0::7"}, true},
		{policy.Endpoint{Namespace: "bank", Addr: "10.0.0.1"}, false}, // the IP, but another namespace
		{policy.Endpoint{Namespace: "shop", Addr: "10.0.0.9"}, false},
		{policy.Endpoint{Namespace: "shop", Addr: "10.0.0.3"}, false},
		{policy.Endpoint{Namespace: "shop", Addr: "10.0.0.4"}, false},
		{policy.Endpoint{Namespace: "shop", Addr: "not-an-ip"}, false},
	} {
		if got := px.Has(tc.e); got != tc.want {
			t.Errorf("Has(%v) = %v, want %v", tc.e, got, tc.want)
		}
	}
}

// A real SDS stream over TCP: its peer address is what the proxy's
// endpoint is matched against.
func TestConnectedProxiesOverGRPC(t *testing.T) {
	web := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	srv, err := sds.New(sds.Config{Source: sds.NewBroadcaster(),
		Authenticate: func(context.Context) (sds.Peer, error) { return sds.Peer{ID: web}, nil }})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sdstest.Serve(t, srv, l)
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := sdstest.New(sdstest.Config{Conn: conn, Node: "web-1", Names: []string{sds.RootsName}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect()
	testenv.Eventually(t, "the stream is connected", func() error {
		if len(srv.Status()) != 1 {
			return errors.New("no stream yet")
		}
		return nil
	})
	px, err := admin.ConnectedProxies(srv)(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !px.Has(policy.Endpoint{Namespace: "shop", Pod: "web-1", Addr: "127.0.0.1"}) || px.Has(policy.Endpoint{Namespace: "bank", Addr: "127.0.0.1"}) {
		t.Errorf("streams %+v: the proxy at 127.0.0.1 in shop is not found, or found for bank", srv.Status())
	}
}
