package envoysim_test

import (
	"context"
	"crypto/x509"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/atomicfile"
	"github.com/meshca/meshca/internal/envoysim"
	"github.com/meshca/meshca/internal/envoysim/envoysimtest"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
	"github.com/meshca/meshca/sds"
)

// mesh is web and db, each an application behind a simulated proxy fed by
// its own agent, web reaching db and db reaching web through the proxies.
type mesh struct {
	ca                  *ca.Authority
	web, db             *proxy
	webApp, dbApp       netip.AddrPort
	webSocket, dbSocket string
	webAgent, dbAgent   *sds.Broadcaster
	dbSnap              sds.Snapshot
}

func newMesh(t *testing.T, ctx context.Context, pol policy.Policy) *mesh {
	t.Helper()
	m := &mesh{ca: catest.NewAuthority(t, nil), webApp: envoysimtest.App(t, "web: "), dbApp: envoysimtest.App(t, "db: ")}
	m.dbSnap = issue(t, m.ca, dbID)
	m.webSocket, m.webAgent = agent(t, issue(t, m.ca, webID))
	m.dbSocket, m.dbAgent = agent(t, m.dbSnap)
	// The inbound ports are known once bound; then each side learns the
	// other's and the configuration is rendered again.
	m.web = run(t, ctx, service(webFQDN, m.webApp, m.webSocket, pol))
	m.db = run(t, ctx, service(dbFQDN, m.dbApp, m.dbSocket, pol))
	m.setPolicy(t, ctx, pol)
	return m
}

// setPolicy renders both proxies for pol and waits until they run it.
func (m *mesh) setPolicy(t *testing.T, ctx context.Context, pol policy.Policy) {
	t.Helper()
	webIn, dbIn := m.web.addr(t, envoyconfig.InboundListener), m.db.addr(t, envoyconfig.InboundListener)
	m.web.apply(t, ctx, service(webFQDN, m.webApp, m.webSocket, pol, destination(dbFQDN, dbIn)))
	m.db.apply(t, ctx, service(dbFQDN, m.dbApp, m.dbSocket, pol, destination(webFQDN, webIn)))
	if pol.Enabled {
		m.web.waitSecrets(t, ctx)
		m.db.waitSecrets(t, ctx)
	}
}

// toDB is web's outbound listener for db.
func (m *mesh) toDB(t *testing.T) string {
	t.Helper()
	return m.web.addr(t, envoyconfig.OutboundName(destination(dbFQDN, m.db.addr(t, envoyconfig.InboundListener))))
}

func (m *mesh) toWeb(t *testing.T) string {
	t.Helper()
	return m.db.addr(t, envoyconfig.OutboundName(destination(webFQDN, m.web.addr(t, envoyconfig.InboundListener))))
}

const (
	mtlsChain      = "listener.inbound.mtls.downstream_cx_total"
	plaintextChain = "listener.inbound.plaintext.downstream_cx_total"
	noChain        = "listener.inbound.no_filter_chain_match"
)

// expect is how traffic must go under a policy.
type expect struct {
	dbChain       string // the chain web's connections to db take at db
	dbPlaintext   bool   // db accepts a plaintext client
	webPlaintext  bool   // web accepts a plaintext client
	webChainForDB string // the chain db's connections to web take at web
}

var policies = []struct {
	name string
	pol  policy.Policy
	want expect
}{
	{"strict", policy.Policy{Enabled: true, Mode: policy.ModeStrict},
		expect{dbChain: mtlsChain, webChainForDB: mtlsChain}},
	{"permissive", policy.Policy{Enabled: true, Mode: policy.ModePermissive},
		expect{dbChain: mtlsChain, dbPlaintext: true, webPlaintext: true, webChainForDB: mtlsChain}},
	{"disabled", policy.Policy{Enabled: false},
		expect{dbChain: plaintextChain, dbPlaintext: true, webPlaintext: true, webChainForDB: plaintextChain}},
	// db is excluded: web reaches it in plaintext and db takes plaintext,
	// while web stays STRICT and db still reaches it with mTLS.
	{"db excluded", policy.Policy{Enabled: true, Excluded: []string{dbFQDN}},
		expect{dbChain: plaintextChain, dbPlaintext: true, webChainForDB: mtlsChain}},
}

// check sends traffic every way and compares with want.
func (m *mesh) check(t *testing.T, ctx context.Context, want expect) {
	t.Helper()
	before := m.db.counter(want.dbChain)
	if got := envoysimtest.Exchange(t, ctx, m.toDB(t), "hello", nil); got != "db: hello" {
		t.Fatalf("web → db through the proxies got %q, want %q", got, "db: hello")
	}
	m.db.waitCounter(t, ctx, want.dbChain, before+1)

	before = m.web.counter(want.webChainForDB)
	if got := envoysimtest.Exchange(t, ctx, m.toWeb(t), "hi", nil); got != "web: hi" {
		t.Fatalf("db → web through the proxies got %q, want %q", got, "web: hi")
	}
	m.web.waitCounter(t, ctx, want.webChainForDB, before+1)

	for _, side := range []struct {
		name   string
		px     *proxy
		accept bool
	}{{"db", m.db, want.dbPlaintext}, {"web", m.web, want.webPlaintext}} {
		refused := side.px.counter(noChain)
		got := envoysimtest.Exchange(t, ctx, side.px.addr(t, envoyconfig.InboundListener), "plain", nil)
		switch {
		case side.accept && got != side.name+": plain":
			t.Fatalf("plaintext client to %s's inbound got %q, want it accepted", side.name, got)
		case !side.accept && got != "":
			t.Fatalf("plaintext client to %s's inbound got %q, want it refused", side.name, got)
		case !side.accept:
			side.px.waitCounter(t, ctx, noChain, refused+1)
		}
	}
}

func TestTrafficFollowsThePolicy(t *testing.T) {
	for _, p := range policies {
		t.Run(p.name, func(t *testing.T) {
			ctx := testCtx(t)
			m := newMesh(t, ctx, p.pol)
			m.check(t, ctx, p.want)
		})
	}
}

func TestPolicyChangesApplyWithoutRestart(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t, ctx, policies[0].pol)
	webIn, dbIn := m.web.addr(t, envoyconfig.InboundListener), m.db.addr(t, envoyconfig.InboundListener)
	m.check(t, ctx, policies[0].want)
	for _, p := range append(policies[1:], policies[0]) {
		t.Logf("switching to %s", p.name)
		m.setPolicy(t, ctx, p.pol)
		m.check(t, ctx, p.want)
	}
	// The same sockets served throughout.
	if got := m.web.addr(t, envoyconfig.InboundListener); got != webIn {
		t.Errorf("web's inbound moved from %s to %s", webIn, got)
	}
	if got := m.db.addr(t, envoyconfig.InboundListener); got != dbIn {
		t.Errorf("db's inbound moved from %s to %s", dbIn, got)
	}
}

func TestInboundMTLSChecksTheClient(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t, ctx, policies[0].pol)
	dbIn := m.db.addr(t, envoyconfig.InboundListener)
	client := issue(t, m.ca, spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/client"))

	var seen []*x509.Certificate
	if got := envoysimtest.Exchange(t, ctx, dbIn, "direct", clientTLS(client, &seen)); got != "db: direct" {
		t.Fatalf("mTLS client with a mesh certificate got %q", got)
	}
	if len(seen) != 1 || !seen[0].Equal(m.dbSnap.Chain[0]) {
		t.Errorf("db's proxy presented %v, want db's certificate from its agent", seen)
	}

	handshakeErrors := "listener.inbound.mtls.ssl.handshake_error"
	refused := func(name string, cfg func() sds.Snapshot) {
		t.Helper()
		n := m.db.counter(handshakeErrors)
		snap := cfg()
		tc := clientTLS(snap, nil)
		if snap.Chain == nil {
			tc.Certificates = nil
		}
		if got := envoysimtest.Exchange(t, ctx, dbIn, "direct", tc); got != "" {
			t.Fatalf("%s: got %q, want the handshake refused", name, got)
		}
		m.db.waitCounter(t, ctx, handshakeErrors, n+1)
	}
	refused("no client certificate", func() sds.Snapshot { return sds.Snapshot{} })
	refused("certificate from another CA", func() sds.Snapshot {
		return issue(t, catest.NewAuthority(t, nil), spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/client"))
	})

	// Only peers of the configured trust domain are accepted.
	p := service(dbFQDN, m.dbApp, m.dbSocket, policies[0].pol, destination(webFQDN, m.web.addr(t, envoyconfig.InboundListener)))
	p.TrustDomain = spiffeid.RequireTrustDomainFromString("example.org")
	m.db.apply(t, ctx, p)
	refused("client outside the trust domain", func() sds.Snapshot { return client })
}

func TestSDSPushesReachNewConnections(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t, ctx, policies[0].pol)
	dbIn := m.db.addr(t, envoyconfig.InboundListener)
	client := issue(t, m.ca, spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/client"))
	held := m.db.Sim.Status().Secrets

	// A renewed certificate is presented from the next handshake on.
	renewed := issue(t, m.ca, dbID)
	if err := m.dbAgent.Set(renewed); err != nil {
		t.Fatal(err)
	}
	m.db.Wait(t, ctx, "the renewed certificate arrives", func(s envoysim.Status) bool {
		return s.Secrets[sds.CertName] != held[sds.CertName]
	})
	var seen []*x509.Certificate
	if got := envoysimtest.Exchange(t, ctx, dbIn, "x", clientTLS(client, &seen)); got != "db: x" {
		t.Fatalf("got %q", got)
	}
	if len(seen) != 1 || !seen[0].Equal(renewed.Chain[0]) {
		t.Errorf("db's proxy presented %v, want the renewed certificate (serial %v)", seen, renewed.Chain[0].SerialNumber)
	}

	// A trust bundle without the mesh's root: its clients are refused.
	other := catest.NewRoot(t, ca.Validity{NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)})
	if err := m.dbAgent.Set(sds.Snapshot{Chain: renewed.Chain, Key: renewed.Key, Roots: []*x509.Certificate{other}}); err != nil {
		t.Fatal(err)
	}
	m.db.Wait(t, ctx, "the new trust bundle arrives", func(s envoysim.Status) bool {
		return s.Secrets[sds.RootsName] != held[sds.RootsName]
	})
	n := m.db.counter("listener.inbound.mtls.ssl.handshake_error")
	if got := envoysimtest.Exchange(t, ctx, dbIn, "x", clientTLS(client, nil)); got != "" {
		t.Fatalf("client of a root no longer trusted got %q", got)
	}
	m.db.waitCounter(t, ctx, "listener.inbound.mtls.ssl.handshake_error", n+1)
	// And so is web, whose mTLS connections no longer verify.
	if got := envoysimtest.Exchange(t, ctx, m.toDB(t), "x", nil); got != "" {
		t.Errorf("web → db got %q after db stopped trusting web's root", got)
	}
}

func TestOutboundMTLSChecksTheServer(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t, ctx, policies[0].pol)
	held := m.web.Sim.Status().Secrets[sds.RootsName]
	// web's bundle loses the mesh's root: db's certificate no longer verifies.
	other := catest.NewRoot(t, ca.Validity{NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)})
	snap := issue(t, m.ca, webID)
	snap.Roots = []*x509.Certificate{other}
	if err := m.webAgent.Set(snap); err != nil {
		t.Fatal(err)
	}
	m.web.Wait(t, ctx, "the new trust bundle arrives", func(s envoysim.Status) bool {
		return s.Secrets[sds.RootsName] != held
	})
	cluster := "cluster." + envoyconfig.OutboundName(destination(dbFQDN, m.db.addr(t, envoyconfig.InboundListener)))
	n := m.web.counter(cluster + ".ssl.handshake_error")
	if got := envoysimtest.Exchange(t, ctx, m.toDB(t), "x", nil); got != "" {
		t.Fatalf("web → db got %q, though web cannot verify db", got)
	}
	m.web.waitCounter(t, ctx, cluster+".ssl.handshake_error", n+1)
}

func TestListenerFilterTimeout(t *testing.T) {
	for _, p := range policies[:2] {
		t.Run(p.name, func(t *testing.T) {
			ctx := testCtx(t)
			m := newMesh(t, ctx, p.pol)
			// A client that waits for the server to speak first.
			c, err := (&net.Dialer{}).DialContext(ctx, "tcp", m.db.addr(t, envoyconfig.InboundListener))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if dl, ok := ctx.Deadline(); ok {
				_ = c.SetDeadline(dl)
			}
			// Two waiters: the poll ticker and the inspection's timer.
			if err := m.db.Clock.BlockUntilContext(ctx, 2); err != nil {
				t.Fatal(err)
			}
			m.db.Clock.Advance(15 * time.Second)
			got, _ := io.ReadAll(io.LimitReader(c, 4))
			if want := map[bool]string{true: "db: ", false: ""}[p.want.dbPlaintext]; string(got) != want {
				t.Errorf("silent client got %q, want %q", got, want)
			}
		})
	}
}

func TestRefusedFilesKeepTheConfiguration(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t, ctx, policies[0].pol)
	good := m.db.Sim.Status().LDS.Version
	lds := filepath.Join(m.db.dir, envoyconfig.LDSFile)
	if err := atomicfile.Write(lds, []byte(`{"type_url": "nonsense"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	m.db.Poll()
	st := m.db.Wait(t, ctx, "the file is refused", func(s envoysim.Status) bool { return s.LDS.Err != nil })
	if st.LDS.Version != good {
		t.Errorf("version %s after a refused file, want %s kept", st.LDS.Version, good)
	}
	m.check(t, ctx, policies[0].want)
	// A valid file is taken again.
	m.setPolicy(t, ctx, policies[1].pol)
	if err := m.db.Sim.Status().LDS.Err; err != nil {
		t.Errorf("error %v kept after a valid file", err)
	}
	m.check(t, ctx, policies[1].want)
}

func TestUnsupportedConfigurationIsRefused(t *testing.T) {
	ctx := testCtx(t)
	socket, _ := agent(t, issue(t, catest.NewAuthority(t, nil), dbID))
	p := service(dbFQDN, envoysimtest.App(t, "db: "), socket, policies[0].pol)
	res, err := envoyconfig.Render(p)
	if err != nil {
		t.Fatal(err)
	}
	res.Listeners[0].PerConnectionBufferLimitBytes = wrapperspb.UInt32(1024)
	px := run(t, ctx, p)
	if err := envoyconfig.Write(px.dir, res); err != nil {
		t.Fatal(err)
	}
	px.Poll()
	st := px.Wait(t, ctx, "the listener is refused", func(s envoysim.Status) bool { return s.LDS.Err != nil })
	if !strings.Contains(st.LDS.Err.Error(), "per_connection_buffer_limit_bytes") {
		t.Errorf("error %v does not name the unsupported field", st.LDS.Err)
	}
}

func TestNewChecksTheBootstrap(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{
		"missing":   "",
		"malformed": "{",
		"ads":       `{"dynamic_resources": {"ads_config": {"api_type": "GRPC"}}}`,
	} {
		path := filepath.Join(dir, name+".json")
		if content != "" {
			if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := envoysim.New(envoysim.Config{Bootstrap: path}); err == nil || !strings.HasPrefix(err.Error(), "envoysim: ") {
			t.Errorf("%s bootstrap: New = %v, want an envoysim error", name, err)
		}
	}
}

func TestRunNeedsTheFiles(t *testing.T) {
	p := service(dbFQDN, netip.MustParseAddrPort("127.0.0.1:1"), "/nonexistent/agent.sock", policies[0].pol)
	sim, err := envoysim.New(envoysim.Config{Bootstrap: writeBootstrap(t, p, t.TempDir())})
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Run(testCtx(t)); err == nil {
		t.Error("Run started without its LDS and CDS files")
	}
}
