package agent_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/agent"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
	"github.com/meshca/meshca/sds"
)

const (
	webFQDN = "web.shop.svc.cluster.local"
	dbFQDN  = "db.shop.svc.cluster.local"
)

// Policies the tests move between.
var (
	strictAll   = policy.Policy{Enabled: true, Mode: policy.ModeStrict}
	webExcluded = policy.Policy{Enabled: true, Mode: policy.ModeStrict, Excluded: []string{webFQDN}}
	mtlsOff     = policy.Policy{Enabled: false, Mode: policy.ModeStrict}
)

// proxyTemplate is the web proxy: inbound on listen to the application at
// app, and db reached through it.
func proxyTemplate(listen, app netip.AddrPort) envoyconfig.Proxy {
	return envoyconfig.Proxy{
		Service: envoyconfig.Service{FQDN: webFQDN, Listen: listen, App: app},
		Destinations: []envoyconfig.Destination{{FQDN: dbFQDN, Listen: netip.MustParseAddrPort("127.0.0.1:15432"),
			Address: "127.0.0.1", Port: 5432}},
		TrustDomain: catest.TrustDomain,
	}
}

// envoyConfig is m.config for web with the Envoy configuration in a fresh
// directory.
func (m *mesh) envoyConfig(t *testing.T) agent.Config {
	t.Helper()
	cfg := m.config(t, "shop", "web")
	cfg.EnvoyConfigDir = filepath.Join(t.TempDir(), "envoy")
	cfg.Proxy = proxyTemplate(netip.MustParseAddrPort("127.0.0.1:15006"), netip.MustParseAddrPort("127.0.0.1:8080"))
	return cfg
}

func version(t *testing.T, p policy.Policy) string {
	t.Helper()
	v, err := sds.PolicyVersion(p)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// applied waits until the agent has written p from the server and the
// server counts the agent's ACK of it.
func (m *mesh) applied(t *testing.T, ctx context.Context, a *testAgent, p policy.Policy) {
	t.Helper()
	v := version(t, p)
	eventually(t, ctx, "the agent applied and ACKed "+p.String(), func() error {
		st := a.Status()
		if st.PolicySource != agent.PolicyFromServer || st.PolicyVersion != v {
			return fmt.Errorf("agent holds %s policy %s (error %v)", st.PolicySource, st.PolicyVersion, st.PolicyError)
		}
		if acked, watching := m.central.PolicyAcked(v); acked != 1 || watching != 1 {
			return fmt.Errorf("server counts %d of %d agents on it", acked, watching)
		}
		return nil
	})
	if st := a.Status(); st.Policy == nil || !st.Policy.Equal(p) || st.PolicyError != nil {
		t.Errorf("Status: policy %v, error %v; want %v", st.Policy, st.PolicyError, p)
	}
}

// files reads and validates what the agent wrote.
func files(t *testing.T, dir string) *envoyconfig.Resources {
	t.Helper()
	r, err := envoyconfig.Read(dir)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// inboundMode tells from the inbound listener's chains what it enforces:
// STRICT is one TLS chain requiring a client certificate; DISABLE one
// plaintext chain matching every connection.
func inboundMode(t *testing.T, r *envoyconfig.Resources) policy.Mode {
	t.Helper()
	var in *listenerv3.Listener
	for _, l := range r.Listeners {
		if l.GetName() == envoyconfig.InboundListener {
			in = l
		}
	}
	if in == nil {
		t.Fatal("no inbound listener")
	}
	chains := in.GetFilterChains()
	if len(chains) != 1 {
		t.Fatalf("inbound listener has %d chains, want 1", len(chains))
	}
	c := chains[0]
	switch c.GetName() {
	case envoyconfig.ChainMTLS:
		ctx := &tlsv3.DownstreamTlsContext{}
		if err := c.GetTransportSocket().GetTypedConfig().UnmarshalTo(ctx); err != nil {
			t.Fatalf("mTLS chain: %v", err)
		}
		if !ctx.GetRequireClientCertificate().GetValue() || c.GetFilterChainMatch().GetTransportProtocol() != "tls" {
			t.Fatalf("mTLS chain does not require a client certificate on TLS: %v", ctx)
		}
		return policy.ModeStrict
	case envoyconfig.ChainPlaintext:
		if c.GetTransportSocket() != nil || c.GetFilterChainMatch() != nil {
			t.Fatalf("plaintext chain has a transport socket or a match: %v", c)
		}
		return policy.ModeDisable
	}
	t.Fatalf("unexpected chain %q", c.GetName())
	return ""
}

// dbUsesMTLS reports whether the cluster to db originates TLS.
func dbUsesMTLS(t *testing.T, r *envoyconfig.Resources) bool {
	t.Helper()
	for _, c := range r.Clusters {
		if c.GetName() == envoyconfig.OutboundName(envoyconfig.Destination{FQDN: dbFQDN, Port: 5432}) {
			return c.GetTransportSocket() != nil
		}
	}
	t.Fatal("no cluster for db")
	return false
}

// bootstrap reads and validates the bootstrap the agent wrote.
func bootstrap(t *testing.T, dir string) *bootstrapv3.Bootstrap {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, envoyconfig.BootstrapFile))
	if err != nil {
		t.Fatal(err)
	}
	boot := &bootstrapv3.Bootstrap{}
	if err := protojson.Unmarshal(b, boot); err != nil {
		t.Fatal(err)
	}
	if err := envoyconfig.Validate(boot); err != nil {
		t.Fatal(err)
	}
	return boot
}

func missing(t *testing.T, dir string, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := os.Stat(filepath.Join(dir, n)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s exists (err %v) before any policy", n, err)
		}
	}
}

// TestEnforcesTheServersPolicy: the agent renders the policy the server
// serves, and again at each change, toggling mTLS off and on and excluding
// its service, and ACKs each one upstream once written.
func TestEnforcesTheServersPolicy(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	m.setPolicy(t, strictAll)
	cfg := m.envoyConfig(t)
	a := m.startReady(t, ctx, cfg)
	m.applied(t, ctx, a, strictAll)

	dir := cfg.EnvoyConfigDir
	boot := bootstrap(t, dir)
	sock := boot.GetStaticResources().GetClusters()[0].GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].
		GetEndpoint().GetAddress().GetPipe().GetPath()
	if sock != cfg.SocketPath || boot.GetNode().GetId() != webFQDN {
		t.Errorf("bootstrap: SDS socket %q, node %q; want %q, %q", sock, boot.GetNode().GetId(), cfg.SocketPath, webFQDN)
	}
	if got := boot.GetDynamicResources().GetLdsConfig().GetPathConfigSource().GetPath(); got != filepath.Join(dir, envoyconfig.LDSFile) {
		t.Errorf("bootstrap reads LDS from %q", got)
	}
	r := files(t, dir)
	if mode := inboundMode(t, r); mode != policy.ModeStrict || !dbUsesMTLS(t, r) {
		t.Fatalf("under %v: inbound %s, db over mTLS %v", strictAll, mode, dbUsesMTLS(t, r))
	}

	for _, step := range []struct {
		p       policy.Policy
		inbound policy.Mode
		dbMTLS  bool
	}{
		{webExcluded, policy.ModeDisable, true},
		{mtlsOff, policy.ModeDisable, false},
		{strictAll, policy.ModeStrict, true},
	} {
		m.setPolicy(t, step.p)
		m.applied(t, ctx, a, step.p)
		r := files(t, dir)
		if mode := inboundMode(t, r); mode != step.inbound || dbUsesMTLS(t, r) != step.dbMTLS {
			t.Fatalf("under %v: inbound %s, db over mTLS %v; want %s, %v", step.p, mode, dbUsesMTLS(t, r), step.inbound, step.dbMTLS)
		}
	}
	v := version(t, strictAll)
	if got := metric(t, a.reg, "meshca_agent_policy_applied_info", "version", v, "source", "server", "inbound_mode", "STRICT"); got != 1 {
		t.Errorf("meshca_agent_policy_applied_info{version=%s,source=server,inbound_mode=STRICT} = %v, want 1", v, got)
	}
	if got := metric(t, a.reg, "meshca_agent_policy_applied_info", "version", version(t, mtlsOff)); got != -1 {
		t.Errorf("the info metric still has the earlier policy: %v", got)
	}
	for _, stage := range []string{"parse", "render", "write"} {
		if got := metric(t, a.reg, "meshca_agent_policy_render_failures_total", "stage", stage); got != 0 {
			t.Errorf("render failures at %s: %v", stage, got)
		}
	}
	if n := m.nacks.seen(); len(n) != 0 {
		t.Errorf("the agent NACKed: %v", n)
	}
	if got := metric(t, m.centralReg, "meshca_sds_acks_total", "resource", sds.PolicyName); got != 4 {
		t.Errorf("server counted %v policy ACKs, want 4", got)
	}
}

// TestWaitsForThePolicyThenFailsClosed: nothing is written while the
// policy has not arrived; after PolicyWait the fail-closed fallback is,
// and the server's policy replaces it when it comes.
func TestWaitsForThePolicyThenFailsClosed(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	cfg := m.envoyConfig(t)
	cfg.PolicyWait = 10 * time.Second
	a := m.startReady(t, ctx, cfg)
	// The renewal and the policy wait.
	blockUntil(t, ctx, m.clock, 2)
	missing(t, cfg.EnvoyConfigDir, envoyconfig.LDSFile, envoyconfig.CDSFile, envoyconfig.BootstrapFile)
	if st := a.Status(); st.PolicySource != "" {
		t.Fatalf("policy source %q before any policy", st.PolicySource)
	}

	m.clock.Advance(cfg.PolicyWait - time.Millisecond)
	blockUntil(t, ctx, m.clock, 2)
	missing(t, cfg.EnvoyConfigDir, envoyconfig.LDSFile, envoyconfig.CDSFile, envoyconfig.BootstrapFile)

	m.clock.Advance(time.Millisecond)
	eventually(t, ctx, "the fallback is written", func() error {
		if st := a.Status(); st.PolicySource != agent.PolicyFallback {
			return fmt.Errorf("policy source %q", st.PolicySource)
		}
		return nil
	})
	if st := a.Status(); !st.Policy.Equal(agent.FallbackPolicy()) || st.PolicyVersion != version(t, agent.FallbackPolicy()) {
		t.Errorf("fallback status: %v at %s", st.Policy, st.PolicyVersion)
	}
	bootstrap(t, cfg.EnvoyConfigDir)
	r := files(t, cfg.EnvoyConfigDir)
	if mode := inboundMode(t, r); mode != policy.ModeStrict || !dbUsesMTLS(t, r) {
		t.Fatalf("fallback: inbound %s, db over mTLS %v; want it fail-closed", mode, dbUsesMTLS(t, r))
	}
	if got := metric(t, a.reg, "meshca_agent_policy_applied_info", "source", "fallback", "inbound_mode", "STRICT"); got != 1 {
		t.Errorf("applied info for the fallback = %v, want 1", got)
	}

	m.setPolicy(t, mtlsOff)
	m.applied(t, ctx, a, mtlsOff)
	if mode := inboundMode(t, files(t, cfg.EnvoyConfigDir)); mode != policy.ModeDisable {
		t.Fatalf("after the server's policy: inbound %s", mode)
	}
}

// TestServerWithoutPolicy: a server that serves no policy refuses the
// name; the agent writes the fallback at once, without waiting, and
// follows the trust bundle alone.
func TestServerWithoutPolicy(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	m.noPolicy.Store(true)
	cfg := m.envoyConfig(t)
	cfg.PolicyWait = -1 // only the refusal can end the wait
	a := m.startReady(t, ctx, cfg)
	eventually(t, ctx, "the fallback is written", func() error {
		if st := a.Status(); st.PolicySource != agent.PolicyFallback {
			return fmt.Errorf("policy source %q", st.PolicySource)
		}
		return nil
	})
	if mode := inboundMode(t, files(t, cfg.EnvoyConfigDir)); mode != policy.ModeStrict {
		t.Fatalf("fallback inbound %s, want STRICT", mode)
	}
	for _, s := range m.central.Status() {
		if len(s.Subscribed) != 1 || s.Subscribed[0] != sds.RootsName {
			t.Errorf("stream subscribed to %v after the refusal, want ROOTCA alone", s.Subscribed)
		}
	}

	r1, r2 := m.first.Issuer().Roots[0], newRoot(t)
	m.setBundle(t, r1, r2)
	m.upstreamAcked(t, ctx, r2)
}

// TestKeepsThePreviousConfiguration: when no policy comes, a valid
// configuration an earlier run left is kept rather than replaced by the
// fallback; the bootstrap is written for it.
func TestKeepsThePreviousConfiguration(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	m.noPolicy.Store(true)
	cfg := m.envoyConfig(t)
	prev := cfg.Proxy
	prev.SDSSocket, prev.Policy = cfg.SocketPath, webExcluded
	r, err := envoyconfig.Render(prev)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(cfg.EnvoyConfigDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := envoyconfig.Write(cfg.EnvoyConfigDir, r); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(filepath.Join(cfg.EnvoyConfigDir, envoyconfig.LDSFile))
	if err != nil {
		t.Fatal(err)
	}

	a := m.startReady(t, ctx, cfg)
	eventually(t, ctx, "the previous configuration is adopted", func() error {
		if st := a.Status(); st.PolicySource != agent.PolicyPrevious {
			return fmt.Errorf("policy source %q", st.PolicySource)
		}
		return nil
	})
	after, err := os.ReadFile(filepath.Join(cfg.EnvoyConfigDir, envoyconfig.LDSFile))
	if err != nil {
		t.Fatal(err)
	}
	if string(after) != string(before) {
		t.Error("the previous LDS file was rewritten")
	}
	bootstrap(t, cfg.EnvoyConfigDir)
	if st := a.Status(); st.Policy != nil || st.PolicyVersion != "" {
		t.Errorf("Status claims to know the previous policy: %v %q", st.Policy, st.PolicyVersion)
	}
}

// TestUnwritablePolicyIsNACKedAndRetried: a configuration that cannot be
// written is NACKed upstream with the reason, the last good files stay,
// and the agent tries again on a new stream after its backoff.
func TestUnwritablePolicyIsNACKedAndRetried(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	m.setPolicy(t, strictAll)
	cfg := m.envoyConfig(t)
	a := m.startReady(t, ctx, cfg)
	m.applied(t, ctx, a, strictAll)
	ldsPath, cdsPath := filepath.Join(cfg.EnvoyConfigDir, envoyconfig.LDSFile), filepath.Join(cfg.EnvoyConfigDir, envoyconfig.CDSFile)
	lds, err := os.ReadFile(ldsPath)
	if err != nil {
		t.Fatal(err)
	}
	// A directory where CDS goes: no file can be renamed over it.
	if err := os.Remove(cdsPath); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(cdsPath, 0o755); err != nil {
		t.Fatal(err)
	}

	m.setPolicy(t, webExcluded)
	eventually(t, ctx, "the server logs the agent's NACK", func() error {
		if len(m.nacks.seen()) == 0 {
			return errors.New("no NACK")
		}
		return nil
	})
	if n := m.nacks.seen(); len(n) != 1 || !strings.Contains(n[0], envoyconfig.CDSFile) {
		t.Errorf("NACKs %q, want one naming %s", n, envoyconfig.CDSFile)
	}
	st := a.Status()
	if st.PolicyVersion != version(t, strictAll) || st.PolicyError == nil {
		t.Errorf("Status after the failure: version %s, error %v; want the last good one and the error", st.PolicyVersion, st.PolicyError)
	}
	if now, err := os.ReadFile(ldsPath); err != nil || string(now) != string(lds) {
		t.Errorf("LDS changed after the failed write (err %v)", err)
	}
	if got := metric(t, a.reg, "meshca_agent_policy_render_failures_total", "stage", "write"); got != 1 {
		t.Errorf("write failures = %v, want 1", got)
	}
	if got := metric(t, m.centralReg, "meshca_sds_nacks_total", "resource", sds.PolicyName); got != 1 {
		t.Errorf("server counted %v policy NACKs, want 1", got)
	}

	if err := os.Remove(cdsPath); err != nil {
		t.Fatal(err)
	}
	// The renewal and the reconnection's backoff (at most RetryMin).
	blockUntil(t, ctx, m.clock, 2)
	m.clock.Advance(agent.DefaultRetryMin)
	m.applied(t, ctx, a, webExcluded)
	if mode := inboundMode(t, files(t, cfg.EnvoyConfigDir)); mode != policy.ModeDisable {
		t.Fatalf("after the retry: inbound %s", mode)
	}
}
