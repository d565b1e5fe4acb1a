package sds_test

import (
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/prometheus/client_golang/prometheus"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// agent is one SDS server on a Unix socket serving a Broadcaster, with the
// snapshot it started with.
type agent struct {
	b      *sds.Broadcaster
	s      *sds.Server
	reg    *prometheus.Registry
	conn   *grpc.ClientConn
	target string
	snap   sds.Snapshot
	root   *x509.Certificate // the authority's root, in snap
}

func newAgent(t *testing.T) *agent {
	t.Helper()
	a := catest.NewAuthority(t, fakeClock())
	ag := &agent{b: sds.NewBroadcaster(), snap: issue(t, a, web)}
	ag.root = ag.snap.Roots[0]
	ag.set(t, ag.snap)
	ag.s, ag.reg = newServer(t, sds.Config{Source: ag.b})
	ag.target, ag.conn = serveUnix(t, ag.s)
	return ag
}

func (ag *agent) set(t *testing.T, s sds.Snapshot) {
	t.Helper()
	if err := ag.b.Set(s); err != nil {
		t.Fatal(err)
	}
}

// holdsRoot is true once the client holds a ROOTCA with root in it.
func holdsRoot(root *x509.Certificate) func(sdstest.State) bool {
	pemRoot := string(ca.EncodeCerts(root))
	return func(s sdstest.State) bool {
		sec, ok := s.Secrets[sds.RootsName]
		return ok && strings.Contains(string(sec.Secret.GetValidationContext().GetTrustedCa().GetInlineBytes()), pemRoot)
	}
}

func onlyStatus(t *testing.T, s *sds.Server) sds.StreamStatus {
	t.Helper()
	st := s.Status()
	if len(st) != 1 {
		t.Fatalf("status lists %d streams, want 1", len(st))
	}
	return st[0]
}

func TestRefusesBadRequests(t *testing.T) {
	ag := newAgent(t)
	rpc := secretv3.NewSecretDiscoveryServiceClient(ag.conn)
	const (
		unknown  = `unknown resource "bogus": this server serves "default", "ROOTCA" and "meshca-mtls-policy"`
		wildcard = `a request must name the secrets it wants ("default", "ROOTCA", "meshca-mtls-policy"): wildcard subscriptions are not served`
		cluster  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
		typeMsg  = `unsupported type URL "` + cluster + `": this server serves only ` + sds.TypeURL
	)
	cases := []struct {
		name    string
		names   []string
		typeURL string
		want    string
	}{
		{"unknown resource", []string{sds.CertName, "bogus"}, sds.TypeURL, unknown},
		{"wildcard", nil, sds.TypeURL, wildcard},
		{"other type", []string{sds.CertName}, cluster, typeMsg},
	}
	for _, tc := range cases {
		for _, mode := range rpcModes {
			t.Run(tc.name+"/"+mode, func(t *testing.T) {
				err := firstAnswer(testCtx(t), rpc, mode, &corev3.Node{Id: "n"}, tc.typeURL, tc.names)
				if st := status.Convert(err); st.Code() != codes.InvalidArgument || st.Message() != tc.want {
					t.Fatalf("got %v %q, want InvalidArgument %q", st.Code(), st.Message(), tc.want)
				}
			})
		}
	}
	// The Envoy-like client sees the same.
	c := connect(t, testCtx(t), sdstest.Config{Conn: ag.conn, Names: []string{"bogus"}, Delta: true})
	st := wait(t, testCtx(t), c, func(s sdstest.State) bool { return !s.Connected })
	if s := status.Convert(st.Err); s.Code() != codes.InvalidArgument || s.Message() != unknown {
		t.Fatalf("client stream ended with %v, want InvalidArgument %q", st.Err, unknown)
	}
}

func TestACKStopsResends(t *testing.T) {
	protocols(t, func(t *testing.T, delta bool) {
		ctx := testCtx(t)
		ag := newAgent(t)
		c := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "web-1", Delta: delta})
		wait(t, ctx, c, hasBoth)
		ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(ag.root), 1, 1)
		first := onlyStatus(t, ag.s).Acked

		// The same content in fresh values: the proxy has it, nothing to send.
		for range 3 {
			ag.set(t, sds.Snapshot{Chain: slices.Clone(ag.snap.Chain), Key: ag.snap.Key, Roots: slices.Clone(ag.snap.Roots)})
		}
		root2 := newRoot(t)
		ag.set(t, withRoots(ag.snap, ag.root, root2))
		st := wait(t, ctx, c, holdsRoot(root2))

		if len(st.Responses) != 2 || !slices.Equal(st.Responses[1].Names, []string{sds.RootsName}) {
			t.Fatalf("responses %+v, want the initial one and then ROOTCA alone", st.Responses)
		}
		if st.Duplicates != 0 {
			t.Errorf("%d secrets arrived that the proxy already held", st.Duplicates)
		}
		ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(root2), 1, 1)
		now := onlyStatus(t, ag.s).Acked
		if now[sds.CertName] != first[sds.CertName] || now[sds.RootsName] == first[sds.RootsName] || now[sds.RootsName] == "" {
			t.Errorf("ACKed versions went from %v to %v; want only ROOTCA to change", first, now)
		}
		for _, m := range []struct {
			name, resource string
			want           float64
		}{
			{"meshca_sds_pushes_total", sds.CertName, 1},
			{"meshca_sds_pushes_total", sds.RootsName, 2},
			{"meshca_sds_acks_total", sds.CertName, 1},
			{"meshca_sds_acks_total", sds.RootsName, 2},
			{"meshca_sds_nacks_total", sds.RootsName, 0},
		} {
			if got := metric(t, ag.reg, m.name, "resource", m.resource); got != m.want {
				t.Errorf("%s{resource=%q} = %v, want %v", m.name, m.resource, got, m.want)
			}
		}
	})
}

func TestNACKKeepsTheLastACKedVersion(t *testing.T) {
	protocols(t, func(t *testing.T, delta bool) {
		ctx := testCtx(t)
		ag := newAgent(t)
		bad, good := newRoot(t), newRoot(t)
		c := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "web-1", Delta: delta, Reject: rejectRoot(bad)})
		wait(t, ctx, c, hasBoth)
		ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(ag.root), 1, 1)
		before := onlyStatus(t, ag.s).Acked

		ag.set(t, withRoots(ag.snap, ag.root, bad))
		eventually(t, ctx, "the server records the NACK", func() bool {
			return onlyStatus(t, ag.s).LastNACK != ""
		})
		ss := onlyStatus(t, ag.s)
		if !strings.Contains(ss.LastNACK, string(errBadRoot)) {
			t.Errorf("LastNACK %q, want the proxy's error", ss.LastNACK)
		}
		if ss.Acked[sds.RootsName] != before[sds.RootsName] {
			t.Errorf("ACKed ROOTCA changed to %s after a NACK, want %s", ss.Acked[sds.RootsName], before[sds.RootsName])
		}
		if a, n := ag.s.Acked(ca.Fingerprint(bad)); a != 0 || n != 1 {
			t.Errorf("Acked(rejected root) = %d/%d, want 0/1", a, n)
		}
		if a, n := ag.s.Acked(ca.Fingerprint(ag.root)); a != 1 || n != 1 {
			t.Errorf("Acked(old root) = %d/%d, want 1/1", a, n)
		}
		if got := metric(t, ag.reg, "meshca_sds_nacks_total", "resource", sds.RootsName); got != 1 {
			t.Errorf("nacks{ROOTCA} = %v, want 1", got)
		}

		// The next change goes out; the rejected version never went out again.
		ag.set(t, withRoots(ag.snap, ag.root, good))
		st := wait(t, ctx, c, holdsRoot(good))
		var nacked int
		for _, r := range st.Responses {
			if r.NACK != "" {
				nacked++
			}
		}
		if len(st.Responses) != 3 || nacked != 1 || st.Responses[1].NACK == "" {
			t.Fatalf("responses %+v, want initial, rejected once, then the good bundle", st.Responses)
		}
		ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(good), 1, 1)
		if a, _ := ag.s.Acked(ca.Fingerprint(bad)); a != 0 {
			t.Errorf("Acked(rejected root) = %d, want 0", a)
		}
	})
}

// TestBundleChangeReachesEveryStream is a root rotation's first step: a
// second root reaches every proxy, and Acked says when it has.
func TestBundleChangeReachesEveryStream(t *testing.T) {
	const n = 50
	ctx := testCtx(t)
	ag := newAgent(t)
	clients := make([]*sdstest.Client, n)
	for i := range clients {
		// One connection per proxy, as Envoys have; half of them delta.
		conn := dial(t, ag.target, grpc.WithTransportCredentials(insecure.NewCredentials()))
		clients[i] = connect(t, ctx, sdstest.Config{Conn: conn, Node: fmt.Sprintf("proxy-%d", i), Delta: i%2 == 1})
	}
	for _, c := range clients {
		wait(t, ctx, c, hasBoth)
	}
	ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(ag.root), n, n)

	root2 := newRoot(t)
	ag.set(t, withRoots(ag.snap, ag.root, root2))
	ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(root2), n, n)
	for _, c := range clients {
		roots, err := c.Roots()
		if err != nil {
			t.Fatal(err)
		}
		if len(roots) != 2 || !roots[1].Equal(root2) {
			t.Fatalf("a proxy trusts %d roots, want both", len(roots))
		}
		if st := c.State(); st.Duplicates != 0 || len(st.Responses) != 2 {
			t.Fatalf("a proxy got %d responses (%d duplicates), want 2 (none)", len(st.Responses), st.Duplicates)
		}
	}
	if got := metric(t, ag.reg, "meshca_sds_root_acked_streams", "fingerprint", ca.Fingerprint(root2)); got != n {
		t.Errorf("root_acked_streams{new root} = %v, want %d", got, n)
	}
	if got := metric(t, ag.reg, "meshca_sds_root_watching_streams"); got != n {
		t.Errorf("root_watching_streams = %v, want %d", got, n)
	}
	for _, p := range []string{"sotw", "delta"} {
		if got := metric(t, ag.reg, "meshca_sds_streams", "protocol", p); got != n/2 {
			t.Errorf("streams{%s} = %v, want %d", p, got, n/2)
		}
	}
}

func TestDisconnectAndUnsubscribeLeaveTheAccounting(t *testing.T) {
	protocols(t, func(t *testing.T, delta bool) {
		ctx := testCtx(t)
		ag := newAgent(t)
		fp := ca.Fingerprint(ag.root)
		c1 := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "one", Delta: delta})
		c2 := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "two", Delta: delta})
		wait(t, ctx, c1, hasBoth)
		wait(t, ctx, c2, hasBoth)
		ackedIs(t, ctx, ag.s, ag.s.Acked, fp, 2, 2)

		c1.Disconnect()
		ackedIs(t, ctx, ag.s, ag.s.Acked, fp, 1, 1)
		if ss := onlyStatus(t, ag.s); ss.Peer.Node != "two" {
			t.Fatalf("status lists %q, want the proxy still connected", ss.Peer.Node)
		}
		proto := map[bool]string{false: "sotw", true: "delta"}[delta]
		if got := metric(t, ag.reg, "meshca_sds_streams", "protocol", proto); got != 1 {
			t.Errorf("streams gauge = %v, want 1", got)
		}

		if err := c2.Unsubscribe(sds.RootsName); err != nil {
			t.Fatal(err)
		}
		ackedIs(t, ctx, ag.s, ag.s.Acked, fp, 0, 0)
		ss := onlyStatus(t, ag.s)
		if _, ok := ss.Acked[sds.RootsName]; ok || ss.Acked[sds.CertName] == "" || len(ss.AckedRoots) != 0 {
			t.Fatalf("after unsubscribing ROOTCA the status says %+v", ss)
		}
	})
}

// TestReconnect: a proxy that comes back names what it has. If that is
// current it is not sent again and counts as ACKed at once; if something
// changed meanwhile, only that is sent.
func TestReconnect(t *testing.T) {
	protocols(t, func(t *testing.T, delta bool) {
		ctx := testCtx(t)
		ag := newAgent(t)
		fp := ca.Fingerprint(ag.root)
		c := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "web-1", Delta: delta})
		wait(t, ctx, c, hasBoth)
		ackedIs(t, ctx, ag.s, ag.s.Acked, fp, 1, 1)
		eventually(t, ctx, "both secrets are ACKed", func() bool { return len(onlyStatus(t, ag.s).Acked) == 2 })
		acked := onlyStatus(t, ag.s).Acked

		c.Disconnect()
		ackedIs(t, ctx, ag.s, ag.s.Acked, fp, 0, 0)
		if err := c.Connect(ctx); err != nil {
			t.Fatal(err)
		}
		ackedIs(t, ctx, ag.s, ag.s.Acked, fp, 1, 1)
		if got := onlyStatus(t, ag.s).Acked; !mapsEqual(got, acked) {
			t.Fatalf("after reconnecting, ACKed %v, want %v", got, acked)
		}
		// A change is the next thing on the new stream: nothing was resent.
		root2 := newRoot(t)
		ag.set(t, withRoots(ag.snap, ag.root, root2))
		st := wait(t, ctx, c, holdsRoot(root2))
		if on := st.OnStream(2); len(on) != 1 || !slices.Equal(on[0].Names, []string{sds.RootsName}) {
			t.Fatalf("second stream got %+v, want only the changed ROOTCA", on)
		}

		// Changed while away: only what changed comes.
		ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(root2), 1, 1)
		c.Disconnect()
		ackedIs(t, ctx, ag.s, ag.s.Acked, fp, 0, 0)
		root3 := newRoot(t)
		ag.set(t, withRoots(ag.snap, ag.root, root3))
		if err := c.Connect(ctx); err != nil {
			t.Fatal(err)
		}
		st = wait(t, ctx, c, holdsRoot(root3))
		if on := st.OnStream(3); len(on) != 1 || !slices.Equal(on[0].Names, []string{sds.RootsName}) {
			t.Fatalf("third stream got %+v, want only the changed ROOTCA", on)
		}
		if st.Duplicates != 0 {
			t.Errorf("%d secrets arrived that the proxy already held", st.Duplicates)
		}
		ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(root3), 1, 1)
	})
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestStaleAndMismatchedAnswers drives the wire directly: an answer to a
// response the server never sent is ignored, and an "ACK" naming another
// version than the response had counts as a rejection.
func TestStaleAndMismatchedAnswers(t *testing.T) {
	ctx := testCtx(t)
	ag := newAgent(t)
	s, err := secretv3.NewSecretDiscoveryServiceClient(ag.conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	names := []string{sds.CertName, sds.RootsName}
	send := func(req *discoveryv3.DiscoveryRequest) {
		t.Helper()
		req.TypeUrl, req.ResourceNames = sds.TypeURL, names
		if err := s.Send(req); err != nil {
			t.Fatal(err)
		}
	}
	send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "raw"}})
	r1, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(r1.GetResources()) != 2 || r1.GetNonce() == "" || r1.GetVersionInfo() == "" {
		t.Fatalf("first response %v", r1)
	}

	send(&discoveryv3.DiscoveryRequest{ResponseNonce: "not-ours", ErrorDetail: &rpcstatus.Status{Message: "stale"}})
	eventually(t, ctx, "the stale request is counted", func() bool {
		return metric(t, ag.reg, "meshca_sds_stale_requests_total") == 1
	})
	if ss := onlyStatus(t, ag.s); ss.LastNACK != "" || len(ss.Acked) != 0 {
		t.Fatalf("a stale NACK changed the stream: %+v", ss)
	}

	send(&discoveryv3.DiscoveryRequest{ResponseNonce: r1.GetNonce(), VersionInfo: r1.GetVersionInfo()})
	ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(ag.root), 1, 1)

	root2 := newRoot(t)
	ag.set(t, withRoots(ag.snap, ag.root, root2))
	r2, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if r2.GetNonce() == r1.GetNonce() || r2.GetVersionInfo() == r1.GetVersionInfo() {
		t.Fatal("a new response reused the nonce or version")
	}
	send(&discoveryv3.DiscoveryRequest{ResponseNonce: r2.GetNonce(), VersionInfo: r1.GetVersionInfo()})
	eventually(t, ctx, "the mismatched ACK is recorded as a rejection", func() bool {
		return strings.Contains(onlyStatus(t, ag.s).LastNACK, "carried version")
	})
	if a, _ := ag.s.Acked(ca.Fingerprint(root2)); a != 0 {
		t.Fatal("a mismatched ACK counted as ACKing the new bundle")
	}
}

func TestDeltaRemovals(t *testing.T) {
	ctx := testCtx(t)
	ag := newAgent(t)

	// A proxy reconnecting with a secret this server does not serve is
	// told it is gone.
	s, err := secretv3.NewSecretDiscoveryServiceClient(ag.conn).DeltaSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: &corev3.Node{Id: "raw"}, TypeUrl: sds.TypeURL,
		ResourceNamesSubscribe:  []string{sds.RootsName},
		InitialResourceVersions: map[string]string{sds.RootsName: "old", "file-cert": "1"}}); err != nil {
		t.Fatal(err)
	}
	r, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(r.GetRemovedResources(), []string{"file-cert"}) || len(r.GetResources()) != 1 ||
		r.GetResources()[0].GetName() != sds.RootsName || r.GetResources()[0].GetVersion() == "" || r.GetSystemVersionInfo() == "" {
		t.Fatalf("response %v, want ROOTCA and file-cert removed", r)
	}

	// A withdrawn certificate is removed from delta proxies; state-of-the-
	// world ones cannot be told and keep it.
	dc := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "delta", Delta: true})
	sc := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "sotw"})
	wait(t, ctx, dc, hasBoth)
	wait(t, ctx, sc, hasBoth)
	ag.set(t, sds.Snapshot{Roots: ag.snap.Roots})
	st := wait(t, ctx, dc, func(s sdstest.State) bool { return !s.Has(sds.CertName) })
	if last := st.Responses[len(st.Responses)-1]; !slices.Equal(last.Removed, []string{sds.CertName}) || len(last.Names) != 0 {
		t.Fatalf("last delta response %+v, want default removed", last)
	}
	root2 := newRoot(t)
	ag.set(t, withRoots(sds.Snapshot{}, ag.root, root2))
	st = wait(t, ctx, sc, holdsRoot(root2))
	if !st.Has(sds.CertName) || len(st.Responses) != 2 {
		t.Fatalf("state-of-the-world proxy: %d responses, holds default %v; want 2 and true", len(st.Responses), st.Has(sds.CertName))
	}
}

// TestDeltaSubscribeAlwaysAnswers: a delta proxy that subscribes gets the
// resource even at the version it was sent, since it may have dropped it
// meanwhile; unsubscribing and subscribing again works too.
func TestDeltaSubscribeAlwaysAnswers(t *testing.T) {
	ctx := testCtx(t)
	ag := newAgent(t)
	fp := ca.Fingerprint(ag.root)
	c := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "web-1", Delta: true})
	wait(t, ctx, c, hasBoth)
	ackedIs(t, ctx, ag.s, ag.s.Acked, fp, 1, 1)

	if err := c.Subscribe(sds.RootsName); err != nil {
		t.Fatal(err)
	}
	st := wait(t, ctx, c, func(s sdstest.State) bool { return len(s.Responses) == 2 })
	if last := st.Responses[1]; !slices.Equal(last.Names, []string{sds.RootsName}) || last.Versions[0] != versionIn(st.Responses[0], sds.RootsName) {
		t.Fatalf("second response %+v, want ROOTCA at the version already sent", last)
	}

	if err := c.Unsubscribe(sds.RootsName); err != nil {
		t.Fatal(err)
	}
	ackedIs(t, ctx, ag.s, ag.s.Acked, fp, 0, 0)
	if err := c.Subscribe(sds.RootsName); err != nil {
		t.Fatal(err)
	}
	wait(t, ctx, c, func(s sdstest.State) bool { return len(s.Responses) == 3 && s.Has(sds.RootsName) })
	ackedIs(t, ctx, ag.s, ag.s.Acked, fp, 1, 1)
}

func versionIn(r sdstest.Response, name string) string {
	if i := slices.Index(r.Names, name); i >= 0 {
		return r.Versions[i]
	}
	return ""
}
