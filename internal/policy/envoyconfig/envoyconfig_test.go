package envoyconfig_test

import (
	"bytes"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshca/meshca/internal/atomicfile"
	"github.com/meshca/meshca/internal/golden"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
)

const (
	web    = "web.shop.svc.cluster.local"
	db     = "db.shop.svc.cluster.local"
	legacy = "legacy.payments.svc.cluster.local"
)

// proxy is web's proxy: it reaches db by IP and legacy by name.
func proxy(pol policy.Policy) envoyconfig.Proxy {
	return envoyconfig.Proxy{
		Policy: pol,
		Service: envoyconfig.Service{
			FQDN:   web,
			Listen: netip.MustParseAddrPort("0.0.0.0:15006"),
			App:    netip.MustParseAddrPort("127.0.0.1:8080"),
		},
		Destinations: []envoyconfig.Destination{
			{FQDN: db, Listen: netip.MustParseAddrPort("127.0.0.1:15001"), Address: "10.0.0.7", Port: 15006},
			{FQDN: legacy, Listen: netip.MustParseAddrPort("127.0.0.1:15002"), Address: legacy, Port: 8080},
		},
		SDSSocket:   "/var/run/meshca/agent.sock",
		TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"),
	}
}

// want is what a case must render, beyond its golden files.
type want struct {
	inbound []string        // chain name/transport protocol, in order
	tls     map[string]bool // destination FQDN → its cluster originates mTLS
}

var cases = []struct {
	name string
	pol  policy.Policy
	want want
}{
	{"strict", policy.Policy{Enabled: true, Mode: policy.ModeStrict, Excluded: []string{legacy}},
		want{[]string{"mtls/tls"}, map[string]bool{db: true, legacy: false}}},
	{"permissive", policy.Policy{Enabled: true, Mode: policy.ModePermissive, Excluded: []string{legacy}},
		want{[]string{"mtls/tls", "plaintext/raw_buffer"}, map[string]bool{db: true, legacy: false}}},
	{"disabled", policy.Policy{Enabled: false, Excluded: []string{legacy}},
		want{[]string{"plaintext/"}, map[string]bool{db: false, legacy: false}}},
	// web itself excluded, by name; legacy by wildcard. db still gets mTLS.
	{"excluded", policy.Policy{Enabled: true, Excluded: []string{web, "*.payments.svc.cluster.local"}},
		want{[]string{"plaintext/"}, map[string]bool{db: true, legacy: false}}},
}

func TestGolden(t *testing.T) {
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := render(t, proxy(c.pol))
			lds, cds := files(t, r)
			golden.Check(t, c.name+".lds.json", lds)
			golden.Check(t, c.name+".cds.json", cds)
		})
	}
	t.Run("bootstrap", func(t *testing.T) {
		golden.Check(t, "bootstrap.json", marshal(t, bootstrap(t, "/etc/meshca/envoy")))
	})
}

// render renders p, which must be valid.
func render(t *testing.T, p envoyconfig.Proxy) *envoyconfig.Resources {
	t.Helper()
	r, err := envoyconfig.Render(p)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// files returns the contents of r's LDS and CDS files.
func files(t *testing.T, r *envoyconfig.Resources) (lds, cds []byte) {
	t.Helper()
	lds, cds, err := r.Files()
	if err != nil {
		t.Fatal(err)
	}
	return lds, cds
}

// bootstrap is the bootstrap of the strict case's proxy, reading its
// files in dir.
func bootstrap(t *testing.T, dir string) *bootstrapv3.Bootstrap {
	t.Helper()
	b, err := envoyconfig.Bootstrap(proxy(cases[0].pol), dir)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func marshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	data, err := envoyconfig.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestModes(t *testing.T) {
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := render(t, proxy(c.pol))
			in := listener(t, r, envoyconfig.InboundListener)
			if len(in.GetListenerFilters()) != 1 || in.GetListenerFilters()[0].GetTypedConfig().GetTypeUrl() !=
				"type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" {
				t.Errorf("inbound listener filters = %v, want only tls_inspector", in.GetListenerFilters())
			}
			var chains []string
			for _, fc := range in.GetFilterChains() {
				chains = append(chains, fc.GetName()+"/"+fc.GetFilterChainMatch().GetTransportProtocol())
				if got := proxyCluster(t, fc); got != envoyconfig.AppCluster {
					t.Errorf("chain %s proxies to %q, want %q", fc.GetName(), got, envoyconfig.AppCluster)
				}
				ctx := &tlsv3.DownstreamTlsContext{}
				hasTLS := unpack(t, fc.GetTransportSocket().GetTypedConfig(), ctx)
				if hasTLS != (fc.GetName() == envoyconfig.ChainMTLS) {
					t.Errorf("chain %s: TLS %v", fc.GetName(), hasTLS)
				}
				if hasTLS {
					if !ctx.GetRequireClientCertificate().GetValue() {
						t.Errorf("chain %s does not require a client certificate", fc.GetName())
					}
					checkCommon(t, ctx.GetCommonTlsContext())
				}
			}
			if !slices.Equal(chains, c.want.inbound) {
				t.Errorf("inbound chains = %v, want %v", chains, c.want.inbound)
			}
			if got, want := in.GetContinueOnListenerFiltersTimeout(), !slices.Equal(c.want.inbound, []string{"mtls/tls"}); got != want {
				t.Errorf("continue_on_listener_filters_timeout = %v, want %v", got, want)
			}
			for _, d := range proxy(c.pol).Destinations {
				name := envoyconfig.OutboundName(d)
				if got := proxyCluster(t, listener(t, r, name).GetFilterChains()[0]); got != name {
					t.Errorf("listener %s proxies to %q", name, got)
				}
				ctx := &tlsv3.UpstreamTlsContext{}
				hasTLS := unpack(t, cluster(t, r, name).GetTransportSocket().GetTypedConfig(), ctx)
				if hasTLS != c.want.tls[d.FQDN] {
					t.Errorf("cluster %s: mTLS %v, want %v", name, hasTLS, c.want.tls[d.FQDN])
				}
				if hasTLS {
					if ctx.GetSni() != d.FQDN {
						t.Errorf("cluster %s: SNI %q", name, ctx.GetSni())
					}
					checkCommon(t, ctx.GetCommonTlsContext())
				}
			}
		})
	}
}

// checkCommon checks a TLS context gets its certificate and roots from the
// agent and accepts only the trust domain's peers.
func checkCommon(t *testing.T, c *tlsv3.CommonTlsContext) {
	t.Helper()
	certs := c.GetTlsCertificateSdsSecretConfigs()
	if len(certs) != 1 || certs[0].GetName() != "default" {
		t.Errorf("certificate secrets = %v, want default", certs)
	}
	combined := c.GetCombinedValidationContext()
	if combined.GetValidationContextSdsSecretConfig().GetName() != "ROOTCA" {
		t.Errorf("validation secret = %v, want ROOTCA", combined.GetValidationContextSdsSecretConfig())
	}
	sans := combined.GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
	if len(sans) != 1 || sans[0].GetSanType() != tlsv3.SubjectAltNameMatcher_URI ||
		sans[0].GetMatcher().GetPrefix() != "spiffe://cluster.local/" {
		t.Errorf("SAN matchers = %v, want URI prefix spiffe://cluster.local/", sans)
	}
	for _, s := range append(certs, combined.GetValidationContextSdsSecretConfig()) {
		grpc := s.GetSdsConfig().GetApiConfigSource().GetGrpcServices()
		if len(grpc) != 1 || grpc[0].GetEnvoyGrpc().GetClusterName() != envoyconfig.SDSCluster {
			t.Errorf("secret %s comes from %v, want cluster %s", s.GetName(), grpc, envoyconfig.SDSCluster)
		}
	}
}

func TestNoTrustDomainSkipsTheSANCheck(t *testing.T) {
	p := proxy(policy.Policy{Enabled: true})
	p.TrustDomain = spiffeid.TrustDomain{}
	r := render(t, p)
	ctx := &tlsv3.DownstreamTlsContext{}
	unpack(t, listener(t, r, envoyconfig.InboundListener).GetFilterChains()[0].GetTransportSocket().GetTypedConfig(), ctx)
	if got := ctx.GetCommonTlsContext().GetValidationContextSdsSecretConfig().GetName(); got != "ROOTCA" {
		t.Errorf("validation secret = %q, want ROOTCA without SAN matchers", got)
	}
}

func TestRoundTrip(t *testing.T) {
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := render(t, proxy(c.pol))
			lds, cds := files(t, r)
			back, err := envoyconfig.Parse(lds, cds)
			if err != nil {
				t.Fatal(err)
			}
			if len(back.Listeners) != len(r.Listeners) || len(back.Clusters) != len(r.Clusters) {
				t.Fatalf("parsed %d listeners and %d clusters, rendered %d and %d",
					len(back.Listeners), len(back.Clusters), len(r.Listeners), len(r.Clusters))
			}
			for i := range r.Listeners {
				if !proto.Equal(back.Listeners[i], r.Listeners[i]) {
					t.Errorf("listener %s changed in the round trip", r.Listeners[i].GetName())
				}
				if err := envoyconfig.Validate(back.Listeners[i]); err != nil {
					t.Error(err)
				}
			}
			for i := range r.Clusters {
				if !proto.Equal(back.Clusters[i], r.Clusters[i]) {
					t.Errorf("cluster %s changed in the round trip", r.Clusters[i].GetName())
				}
				if err := envoyconfig.Validate(back.Clusters[i]); err != nil {
					t.Error(err)
				}
			}
		})
	}
	t.Run("bootstrap", func(t *testing.T) {
		b := bootstrap(t, "/etc/meshca/envoy")
		data := marshal(t, b)
		back := &bootstrapv3.Bootstrap{}
		if err := protojson.Unmarshal(data, back); err != nil {
			t.Fatal(err)
		}
		if err := envoyconfig.Validate(back); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(back, b) {
			t.Error("bootstrap changed in the round trip")
		}
		lds := back.GetDynamicResources().GetLdsConfig().GetPathConfigSource()
		if lds.GetPath() != "/etc/meshca/envoy/lds.json" || lds.GetWatchedDirectory().GetPath() != "/etc/meshca/envoy" {
			t.Errorf("LDS source = %v", lds)
		}
		sds := back.GetStaticResources().GetClusters()
		if len(sds) != 1 || sds[0].GetName() != envoyconfig.SDSCluster ||
			sds[0].GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetPipe().GetPath() != "/var/run/meshca/agent.sock" {
			t.Errorf("static clusters = %v, want the SDS cluster on the agent socket", sds)
		}
	})
}

func TestVersionFollowsContent(t *testing.T) {
	version := func(pol policy.Policy) string {
		r := render(t, proxy(pol))
		resp, err := r.LDS()
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetVersionInfo()
	}
	strict := version(cases[0].pol)
	if again := version(cases[0].pol); again != strict {
		t.Errorf("the same configuration has versions %s and %s", strict, again)
	}
	if other := version(cases[1].pol); other == strict {
		t.Errorf("strict and permissive share version %s", strict)
	}
}

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	for _, c := range cases[:2] {
		r := render(t, proxy(c.pol))
		if err := envoyconfig.Write(dir, r); err != nil {
			t.Fatal(err)
		}
		lds, cds := files(t, r)
		for name, want := range map[string][]byte{envoyconfig.LDSFile: lds, envoyconfig.CDSFile: cds} {
			got, err := os.ReadFile(filepath.Join(dir, name))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s: %s holds something else", c.name, name)
			}
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), atomicfile.TempPrefix) {
			t.Errorf("temporary file %s left in the watched directory", e.Name())
		}
	}
	if len(entries) != 2 {
		t.Errorf("directory holds %d entries, want the 2 files", len(entries))
	}
	b := bootstrap(t, dir)
	path := filepath.Join(t.TempDir(), "envoy.json")
	if err := envoyconfig.WriteBootstrap(path, b); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	back := &bootstrapv3.Bootstrap{}
	if err := protojson.Unmarshal(data, back); err != nil || !proto.Equal(back, b) {
		t.Errorf("bootstrap file does not hold the bootstrap (%v)", err)
	}
}

// TestRead: Read gives back what Write wrote, and refuses a directory
// without both files or with one that does not validate.
func TestRead(t *testing.T) {
	dir := t.TempDir()
	if _, err := envoyconfig.Read(dir); !errors.Is(err, os.ErrNotExist) || !strings.HasPrefix(err.Error(), "envoyconfig: ") {
		t.Errorf("Read of an empty directory = %v, want an envoyconfig error wrapping ErrNotExist", err)
	}
	r := render(t, proxy(cases[0].pol))
	if err := envoyconfig.Write(dir, r); err != nil {
		t.Fatal(err)
	}
	back, err := envoyconfig.Read(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.EqualFunc(back.Listeners, r.Listeners, func(a, b *listenerv3.Listener) bool { return proto.Equal(a, b) }) ||
		!slices.EqualFunc(back.Clusters, r.Clusters, func(a, b *clusterv3.Cluster) bool { return proto.Equal(a, b) }) {
		t.Error("Read does not give back what Write wrote")
	}
	// A listener whose own rules pass and whose tcp_proxy, inside an Any
	// inside the file's Any, lacks its stat prefix.
	l := proto.Clone(listener(t, r, envoyconfig.InboundListener)).(*listenerv3.Listener)
	l.FilterChains[0].Filters[0].ConfigType = &listenerv3.Filter_TypedConfig{
		TypedConfig: mustAny(t, &tcpproxyv3.TcpProxy{ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: "x"}})}
	lds, err := envoyconfig.Marshal(&discoveryv3.DiscoveryResponse{TypeUrl: envoyconfig.ListenerType, Resources: []*anypb.Any{mustAny(t, l)}})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, envoyconfig.LDSFile), lds, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := envoyconfig.Read(dir); err == nil || !strings.Contains(err.Error(), "StatPrefix") {
		t.Errorf("Read of a listener whose tcp_proxy does not validate = %v, want its missing stat prefix", err)
	}
}

func mustAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestInvalidProxies(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*envoyconfig.Proxy)
		want   string
	}{
		{"bad policy", func(p *envoyconfig.Proxy) { p.Policy.Mode = "SOMETIMES" }, "SOMETIMES"},
		{"bad exclusion", func(p *envoyconfig.Proxy) { p.Policy.Excluded = []string{"a..b"} }, "a..b"},
		{"bad service name", func(p *envoyconfig.Proxy) { p.Service.FQDN = "web_1.shop" }, "web_1.shop"},
		{"no listen address", func(p *envoyconfig.Proxy) { p.Service.Listen = netip.AddrPort{} }, "no listen address"},
		{"no app", func(p *envoyconfig.Proxy) { p.Service.App = netip.MustParseAddrPort("127.0.0.1:0") }, "application"},
		{"relative socket", func(p *envoyconfig.Proxy) { p.SDSSocket = "agent.sock" }, "absolute"},
		{"duplicate destination", func(p *envoyconfig.Proxy) {
			d := p.Destinations[0]
			d.Listen = netip.MustParseAddrPort("127.0.0.1:15009")
			p.Destinations = append(p.Destinations, d)
		}, "listed twice"},
		{"shared listen port", func(p *envoyconfig.Proxy) {
			p.Destinations[1].Listen = p.Destinations[0].Listen
		}, "as does destination " + db},
		{"outbound on the inbound port", func(p *envoyconfig.Proxy) {
			p.Service.Listen = p.Destinations[0].Listen
		}, "as does the inbound listener"},
		{"no upstream", func(p *envoyconfig.Proxy) { p.Destinations[0].Port = 0 }, "no upstream"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := proxy(policy.Policy{Enabled: true})
			tt.mutate(&p)
			_, err := envoyconfig.Render(p)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.HasPrefix(err.Error(), "envoyconfig: ") {
				t.Errorf("Render = %v, want an envoyconfig error mentioning %q", err, tt.want)
			}
			if _, err := envoyconfig.Bootstrap(p, "/etc/meshca/envoy"); err == nil {
				t.Error("Bootstrap accepted the proxy")
			}
		})
	}
	t.Run("invalid policy keeps its error", func(t *testing.T) {
		p := proxy(policy.Policy{Enabled: true, Mode: "SOMETIMES"})
		if err := p.Validate(); !errors.Is(err, policy.ErrInvalid) {
			t.Errorf("Validate = %v, want it to wrap policy.ErrInvalid", err)
		}
	})
	t.Run("relative configuration directory", func(t *testing.T) {
		if _, err := envoyconfig.Bootstrap(proxy(policy.Policy{Enabled: true}), "envoy"); err == nil {
			t.Error("Bootstrap accepted a relative directory")
		}
	})
}

func TestValidateLooksInsideAnys(t *testing.T) {
	r := render(t, proxy(policy.Policy{Enabled: true}))
	l := proto.Clone(listener(t, r, envoyconfig.InboundListener)).(*listenerv3.Listener)
	// A tcp_proxy without a stat prefix: the listener's own rules cannot see it.
	bad, err := anypb.New(&tcpproxyv3.TcpProxy{ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: "x"}})
	if err != nil {
		t.Fatal(err)
	}
	l.FilterChains[0].Filters[0].ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: bad}
	if err := l.ValidateAll(); err != nil {
		t.Fatalf("the listener's own validation already fails: %v", err)
	}
	err = envoyconfig.Validate(l)
	if err == nil || !strings.Contains(err.Error(), "StatPrefix") || !strings.Contains(err.Error(), "filter_chains[0].filters[0].typed_config") {
		t.Errorf("Validate = %v, want the tcp_proxy's missing stat prefix, located", err)
	}

	l = proto.Clone(listener(t, r, envoyconfig.InboundListener)).(*listenerv3.Listener)
	l.ListenerFilters[0].GetTypedConfig().TypeUrl = "type.googleapis.com/meshca.NoSuchFilter"
	if err := envoyconfig.Validate(l); err == nil || !strings.Contains(err.Error(), "meshca.NoSuchFilter") {
		t.Errorf("Validate = %v, want the unknown type named", err)
	}
}

func TestParseRefusesOtherTypes(t *testing.T) {
	r := render(t, proxy(policy.Policy{Enabled: true}))
	lds, cds := files(t, r)
	if _, err := envoyconfig.Parse(cds, lds); err == nil {
		t.Error("Parse accepted the files swapped")
	}
	if _, err := envoyconfig.Parse([]byte("{"), cds); err == nil {
		t.Error("Parse accepted malformed JSON")
	}
}

func listener(t *testing.T, r *envoyconfig.Resources, name string) *listenerv3.Listener {
	t.Helper()
	for _, l := range r.Listeners {
		if l.GetName() == name {
			return l
		}
	}
	t.Fatalf("no listener %s", name)
	return nil
}

func cluster(t *testing.T, r *envoyconfig.Resources, name string) *clusterv3.Cluster {
	t.Helper()
	for _, c := range r.Clusters {
		if c.GetName() == name {
			return c
		}
	}
	t.Fatalf("no cluster %s", name)
	return nil
}

// proxyCluster is the cluster of a chain's only filter, a tcp_proxy.
func proxyCluster(t *testing.T, fc *listenerv3.FilterChain) string {
	t.Helper()
	if len(fc.GetFilters()) != 1 {
		t.Fatalf("chain %s has %d filters, want a tcp_proxy", fc.GetName(), len(fc.GetFilters()))
	}
	tp := &tcpproxyv3.TcpProxy{}
	if !unpack(t, fc.GetFilters()[0].GetTypedConfig(), tp) {
		t.Fatalf("chain %s has no tcp_proxy", fc.GetName())
	}
	return tp.GetCluster()
}

// unpack reports whether a is set, and unpacks it into m.
func unpack(t *testing.T, a *anypb.Any, m proto.Message) bool {
	t.Helper()
	if a == nil {
		return false
	}
	if err := a.UnmarshalTo(m); err != nil {
		t.Fatal(err)
	}
	return true
}
