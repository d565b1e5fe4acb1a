package envoysim

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	rawbufferv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshca/meshca/internal/policy/envoyconfig"
)

// Envoy's defaults for fields the configuration may leave out.
const (
	defaultConnectTimeout  = 5 * time.Second
	defaultListenerTimeout = 15 * time.Second
)

// Transport protocols, as tls_inspector names them.
const (
	transportTLS = "tls"
	transportRaw = "raw_buffer"
)

// only refuses every populated field of m not named in allowed, so the
// simulator never silently ignores configuration it does not implement.
func only(m proto.Message, allowed ...string) error {
	var bad []string
	m.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) bool {
		if !slices.Contains(allowed, string(fd.Name())) {
			bad = append(bad, string(fd.Name()))
		}
		return true
	})
	if len(bad) > 0 {
		return fmt.Errorf("%s: unsupported field(s) %s", m.ProtoReflect().Descriptor().Name(), strings.Join(bad, ", "))
	}
	return nil
}

// bootstrap is what the simulator takes from the bootstrap file.
type bootstrap struct {
	node     string
	static   map[string]*clusterSpec
	lds, cds string // file paths
}

func readBootstrap(path string) (*bootstrap, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	b := &bootstrapv3.Bootstrap{}
	if err := protojson.Unmarshal(data, b); err != nil {
		return nil, fmt.Errorf("bootstrap %s: %w", path, err)
	}
	if err := envoyconfig.Validate(b); err != nil {
		return nil, fmt.Errorf("bootstrap %s: %w", path, err)
	}
	if err := only(b, "node", "static_resources", "dynamic_resources"); err != nil {
		return nil, err
	}
	out := &bootstrap{node: b.GetNode().GetId(), static: map[string]*clusterSpec{}}
	if sr := b.GetStaticResources(); sr != nil {
		if err := only(sr, "clusters"); err != nil {
			return nil, err
		}
		for _, c := range sr.GetClusters() {
			spec, err := parseCluster(c)
			if err != nil {
				return nil, err
			}
			if _, dup := out.static[spec.name]; dup {
				return nil, fmt.Errorf("static cluster %s is defined twice", spec.name)
			}
			out.static[spec.name] = spec
		}
	}
	dr := b.GetDynamicResources()
	if err := only(dr, "lds_config", "cds_config"); err != nil {
		return nil, err
	}
	if out.lds, err = fileSource(dr.GetLdsConfig()); err != nil {
		return nil, fmt.Errorf("lds_config: %w", err)
	}
	if out.cds, err = fileSource(dr.GetCdsConfig()); err != nil {
		return nil, fmt.Errorf("cds_config: %w", err)
	}
	return out, nil
}

// fileSource returns the path of a filesystem config source. A watched
// directory is accepted; the simulator polls either way.
func fileSource(cs *corev3.ConfigSource) (string, error) {
	if err := only(cs, "path_config_source", "resource_api_version"); err != nil {
		return "", err
	}
	pcs := cs.GetPathConfigSource()
	if pcs == nil {
		return "", errors.New("only path_config_source is supported")
	}
	if err := only(pcs, "path", "watched_directory"); err != nil {
		return "", err
	}
	if !strings.HasSuffix(pcs.GetPath(), ".json") {
		return "", fmt.Errorf("%s: only JSON files are supported", pcs.GetPath())
	}
	return pcs.GetPath(), nil
}

// parseResources decodes the content of the LDS or CDS file at path and
// returns its version and its resources.
func parseResources(path string, data []byte, typeURL string) (version string, msgs []proto.Message, err error) {
	resp, msgs, err := envoyconfig.ParseResponse(data, typeURL)
	if err != nil {
		return "", nil, fmt.Errorf("%s: %w", path, err)
	}
	return resp.GetVersionInfo(), msgs, nil
}

// secretRef names a secret and the SDS server it comes from.
type secretRef struct {
	source sdsKey
	name   string
}

// sdsKey is one SDS subscription: a cluster and a protocol.
type sdsKey struct {
	cluster string
	delta   bool
}

// validationSpec is a certificate validation context: roots from SDS,
// SAN matchers inline.
type validationSpec struct {
	roots    secretRef
	matchers []sanMatcher
}

type tlsCommon struct {
	cert       *secretRef      // nil: present no certificate
	validation *validationSpec // nil: accept any peer certificate
}

func (c tlsCommon) refs() []secretRef {
	var out []secretRef
	if c.cert != nil {
		out = append(out, *c.cert)
	}
	if c.validation != nil {
		out = append(out, c.validation.roots)
	}
	return out
}

type downstreamTLS struct {
	tlsCommon
	requireClient bool
}

type upstreamTLS struct {
	tlsCommon
	sni string
}

type listenerSpec struct {
	name              string
	addr              string
	inspect           bool          // tls_inspector is configured
	filterTimeout     time.Duration // 0: wait for the client indefinitely
	continueOnTimeout bool
	chains            []*chainSpec
	defaultChain      *chainSpec
}

type chainSpec struct {
	stat      string // the chain's name, or its index
	transport string // "" matches any
	cluster   string
	tls       *downstreamTLS
}

// choose picks the filter chain for a connection as Envoy does for the one
// criterion supported: an exact transport protocol beats none.
func (l *listenerSpec) choose(transport string) *chainSpec {
	for _, c := range l.chains {
		if c.transport == transport {
			return c
		}
	}
	for _, c := range l.chains {
		if c.transport == "" {
			return c
		}
	}
	return l.defaultChain
}

func (l *listenerSpec) refs() []secretRef {
	var out []secretRef
	for _, c := range append(slices.Clone(l.chains), l.defaultChain) {
		if c != nil && c.tls != nil {
			out = append(out, c.tls.refs()...)
		}
	}
	return out
}

type endpoint struct {
	network, address string // for net.Dial
}

type clusterSpec struct {
	name           string
	endpoints      []endpoint
	connectTimeout time.Duration
	tls            *upstreamTLS
	http2          bool
	next           *atomic.Uint64 // round robin
}

func (c *clusterSpec) refs() []secretRef {
	if c.tls == nil {
		return nil
	}
	return c.tls.refs()
}

func parseListener(l *listenerv3.Listener) (*listenerSpec, error) {
	if err := only(l, "name", "address", "listener_filters", "filter_chains", "default_filter_chain",
		"listener_filters_timeout", "continue_on_listener_filters_timeout", "traffic_direction", "stat_prefix"); err != nil {
		return nil, fmt.Errorf("listener %s: %w", l.GetName(), err)
	}
	spec := &listenerSpec{
		name:              l.GetName(),
		continueOnTimeout: l.GetContinueOnListenerFiltersTimeout(),
		filterTimeout:     defaultListenerTimeout,
	}
	if t := l.GetListenerFiltersTimeout(); t != nil {
		spec.filterTimeout = t.AsDuration()
	}
	wrap := func(err error) error { return fmt.Errorf("listener %s: %w", spec.name, err) }
	sa := l.GetAddress().GetSocketAddress()
	if sa == nil {
		return nil, wrap(errors.New("only socket addresses are supported"))
	}
	addr, err := socketAddress(sa, false)
	if err != nil {
		return nil, wrap(err)
	}
	spec.addr = addr.address
	for _, f := range l.GetListenerFilters() {
		if err := only(f, "name", "typed_config"); err != nil {
			return nil, wrap(err)
		}
		m, err := anypb.UnmarshalNew(f.GetTypedConfig(), proto.UnmarshalOptions{})
		if err != nil {
			return nil, wrap(err)
		}
		ti, ok := m.(*tlsinspectorv3.TlsInspector)
		if !ok {
			return nil, wrap(fmt.Errorf("listener filter %s is not supported", f.GetTypedConfig().GetTypeUrl()))
		}
		if err := only(ti); err != nil {
			return nil, wrap(err)
		}
		spec.inspect = true
	}
	seen := map[string]bool{}
	for i, fc := range l.GetFilterChains() {
		c, err := parseChain(fc, i)
		if err != nil {
			return nil, wrap(err)
		}
		if seen[c.transport] {
			return nil, wrap(fmt.Errorf("two filter chains match transport protocol %q", c.transport))
		}
		seen[c.transport] = true
		if c.transport != "" && !spec.inspect && c.transport != transportRaw {
			return nil, wrap(fmt.Errorf("chain %s matches %q, which only tls_inspector detects", c.stat, c.transport))
		}
		spec.chains = append(spec.chains, c)
	}
	if fc := l.GetDefaultFilterChain(); fc != nil {
		if spec.defaultChain, err = parseChain(fc, -1); err != nil {
			return nil, wrap(err)
		}
		if spec.defaultChain.transport != "" {
			return nil, wrap(errors.New("the default filter chain has a match"))
		}
	}
	return spec, nil
}

func parseChain(fc *listenerv3.FilterChain, i int) (*chainSpec, error) {
	c := &chainSpec{stat: fc.GetName()}
	if c.stat == "" {
		c.stat = "chain" + strconv.Itoa(i)
		if i < 0 {
			c.stat = "default"
		}
	}
	wrap := func(err error) error { return fmt.Errorf("filter chain %s: %w", c.stat, err) }
	if err := only(fc, "name", "filter_chain_match", "filters", "transport_socket"); err != nil {
		return nil, wrap(err)
	}
	if m := fc.GetFilterChainMatch(); m != nil {
		if err := only(m, "transport_protocol"); err != nil {
			return nil, wrap(err)
		}
		c.transport = m.GetTransportProtocol()
	}
	if len(fc.GetFilters()) != 1 {
		return nil, wrap(fmt.Errorf("%d network filters; only a single tcp_proxy is supported", len(fc.GetFilters())))
	}
	f := fc.GetFilters()[0]
	if err := only(f, "name", "typed_config"); err != nil {
		return nil, wrap(err)
	}
	m, err := anypb.UnmarshalNew(f.GetTypedConfig(), proto.UnmarshalOptions{})
	if err != nil {
		return nil, wrap(err)
	}
	tp, ok := m.(*tcpproxyv3.TcpProxy)
	if !ok {
		return nil, wrap(fmt.Errorf("network filter %s is not supported", f.GetTypedConfig().GetTypeUrl()))
	}
	if err := only(tp, "stat_prefix", "cluster"); err != nil {
		return nil, wrap(err)
	}
	c.cluster = tp.GetCluster()
	if ts := fc.GetTransportSocket(); ts != nil {
		msg, err := transportSocket(ts)
		if err != nil {
			return nil, wrap(err)
		}
		switch msg := msg.(type) {
		case *rawbufferv3.RawBuffer:
		case *tlsv3.DownstreamTlsContext:
			if c.tls, err = parseDownstream(msg); err != nil {
				return nil, wrap(err)
			}
		default:
			return nil, wrap(fmt.Errorf("transport socket %T is not supported downstream", msg))
		}
	}
	return c, nil
}

func transportSocket(ts *corev3.TransportSocket) (proto.Message, error) {
	if err := only(ts, "name", "typed_config"); err != nil {
		return nil, err
	}
	m, err := anypb.UnmarshalNew(ts.GetTypedConfig(), proto.UnmarshalOptions{})
	if err != nil {
		return nil, err
	}
	if _, ok := m.(*rawbufferv3.RawBuffer); ok {
		if err := only(m); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func parseDownstream(d *tlsv3.DownstreamTlsContext) (*downstreamTLS, error) {
	if err := only(d, "common_tls_context", "require_client_certificate"); err != nil {
		return nil, err
	}
	common, err := parseCommon(d.GetCommonTlsContext())
	if err != nil {
		return nil, err
	}
	if common.cert == nil {
		return nil, errors.New("a server TLS context needs a certificate")
	}
	return &downstreamTLS{tlsCommon: common, requireClient: d.GetRequireClientCertificate().GetValue()}, nil
}

func parseUpstream(u *tlsv3.UpstreamTlsContext) (*upstreamTLS, error) {
	if err := only(u, "common_tls_context", "sni"); err != nil {
		return nil, err
	}
	common, err := parseCommon(u.GetCommonTlsContext())
	if err != nil {
		return nil, err
	}
	return &upstreamTLS{tlsCommon: common, sni: u.GetSni()}, nil
}

func parseCommon(c *tlsv3.CommonTlsContext) (tlsCommon, error) {
	var out tlsCommon
	if c == nil {
		return out, nil
	}
	if err := only(c, "tls_certificate_sds_secret_configs", "validation_context_sds_secret_config",
		"combined_validation_context"); err != nil {
		return out, err
	}
	switch certs := c.GetTlsCertificateSdsSecretConfigs(); len(certs) {
	case 0:
	case 1:
		ref, err := sdsRef(certs[0])
		if err != nil {
			return out, err
		}
		out.cert = &ref
	default:
		return out, errors.New("only one certificate is supported")
	}
	if s := c.GetValidationContextSdsSecretConfig(); s != nil {
		ref, err := sdsRef(s)
		if err != nil {
			return out, err
		}
		out.validation = &validationSpec{roots: ref}
	}
	if cv := c.GetCombinedValidationContext(); cv != nil {
		if err := only(cv, "default_validation_context", "validation_context_sds_secret_config"); err != nil {
			return out, err
		}
		ref, err := sdsRef(cv.GetValidationContextSdsSecretConfig())
		if err != nil {
			return out, err
		}
		matchers, err := parseValidation(cv.GetDefaultValidationContext(), false)
		if err != nil {
			return out, err
		}
		out.validation = &validationSpec{roots: ref, matchers: matchers}
	}
	return out, nil
}

// parseValidation reads the SAN matchers of a validation context; fromSDS
// also allows trusted_ca, which only a secret carries here.
func parseValidation(vc *tlsv3.CertificateValidationContext, fromSDS bool) ([]sanMatcher, error) {
	allowed := []string{"match_typed_subject_alt_names"}
	if fromSDS {
		allowed = append(allowed, "trusted_ca")
	}
	if err := only(vc, allowed...); err != nil {
		return nil, err
	}
	var out []sanMatcher
	for _, m := range vc.GetMatchTypedSubjectAltNames() {
		sm, err := parseSANMatcher(m)
		if err != nil {
			return nil, err
		}
		out = append(out, sm)
	}
	return out, nil
}

func parseSANMatcher(m *tlsv3.SubjectAltNameMatcher) (sanMatcher, error) {
	if err := only(m, "san_type", "matcher"); err != nil {
		return sanMatcher{}, err
	}
	switch m.GetSanType() {
	case tlsv3.SubjectAltNameMatcher_EMAIL, tlsv3.SubjectAltNameMatcher_DNS,
		tlsv3.SubjectAltNameMatcher_URI, tlsv3.SubjectAltNameMatcher_IP_ADDRESS:
	default:
		return sanMatcher{}, fmt.Errorf("SAN type %s is not supported", m.GetSanType())
	}
	sm := m.GetMatcher()
	if err := only(sm, "exact", "prefix", "suffix", "contains", "ignore_case"); err != nil {
		return sanMatcher{}, err
	}
	out := sanMatcher{typ: m.GetSanType(), ignoreCase: sm.GetIgnoreCase()}
	switch p := sm.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		out.op, out.value = opExact, p.Exact
	case *matcherv3.StringMatcher_Prefix:
		out.op, out.value = opPrefix, p.Prefix
	case *matcherv3.StringMatcher_Suffix:
		out.op, out.value = opSuffix, p.Suffix
	case *matcherv3.StringMatcher_Contains:
		out.op, out.value = opContains, p.Contains
	default:
		return sanMatcher{}, errors.New("string matcher without a pattern")
	}
	return out, nil
}

// sdsRef reads an SDS secret config: a name and a gRPC source on a
// cluster.
func sdsRef(s *tlsv3.SdsSecretConfig) (secretRef, error) {
	if err := only(s, "name", "sds_config"); err != nil {
		return secretRef{}, err
	}
	cs := s.GetSdsConfig()
	if err := only(cs, "api_config_source", "resource_api_version", "initial_fetch_timeout"); err != nil {
		return secretRef{}, err
	}
	api := cs.GetApiConfigSource()
	if api == nil {
		return secretRef{}, fmt.Errorf("secret %s: only an api_config_source is supported", s.GetName())
	}
	if err := only(api, "api_type", "transport_api_version", "grpc_services", "set_node_on_first_message_only"); err != nil {
		return secretRef{}, err
	}
	var key sdsKey
	switch api.GetApiType() {
	case corev3.ApiConfigSource_GRPC:
	case corev3.ApiConfigSource_DELTA_GRPC:
		key.delta = true
	default:
		return secretRef{}, fmt.Errorf("secret %s: API type %s is not supported", s.GetName(), api.GetApiType())
	}
	if len(api.GetGrpcServices()) != 1 {
		return secretRef{}, fmt.Errorf("secret %s: want one gRPC service", s.GetName())
	}
	gs := api.GetGrpcServices()[0]
	if err := only(gs, "envoy_grpc"); err != nil {
		return secretRef{}, err
	}
	if err := only(gs.GetEnvoyGrpc(), "cluster_name"); err != nil {
		return secretRef{}, err
	}
	key.cluster = gs.GetEnvoyGrpc().GetClusterName()
	return secretRef{source: key, name: s.GetName()}, nil
}

func parseCluster(c *clusterv3.Cluster) (*clusterSpec, error) {
	wrap := func(err error) error { return fmt.Errorf("cluster %s: %w", c.GetName(), err) }
	if err := only(c, "name", "type", "connect_timeout", "load_assignment", "transport_socket",
		"typed_extension_protocol_options", "lb_policy"); err != nil {
		return nil, wrap(err)
	}
	if c.GetLbPolicy() != clusterv3.Cluster_ROUND_ROBIN {
		return nil, wrap(fmt.Errorf("load balancing policy %s is not supported", c.GetLbPolicy()))
	}
	spec := &clusterSpec{name: c.GetName(), connectTimeout: defaultConnectTimeout, next: &atomic.Uint64{}}
	if t := c.GetConnectTimeout(); t != nil {
		spec.connectTimeout = t.AsDuration()
	}
	typ := c.GetType()
	switch typ {
	case clusterv3.Cluster_STATIC, clusterv3.Cluster_STRICT_DNS, clusterv3.Cluster_LOGICAL_DNS:
	default:
		return nil, wrap(fmt.Errorf("discovery type %s is not supported", typ))
	}
	la := c.GetLoadAssignment()
	if err := only(la, "cluster_name", "endpoints"); err != nil {
		return nil, wrap(err)
	}
	for _, lle := range la.GetEndpoints() {
		if err := only(lle, "lb_endpoints"); err != nil {
			return nil, wrap(err)
		}
		for _, le := range lle.GetLbEndpoints() {
			ep, err := parseEndpoint(le, typ == clusterv3.Cluster_STATIC)
			if err != nil {
				return nil, wrap(err)
			}
			spec.endpoints = append(spec.endpoints, ep)
		}
	}
	if ts := c.GetTransportSocket(); ts != nil {
		msg, err := transportSocket(ts)
		if err != nil {
			return nil, wrap(err)
		}
		switch msg := msg.(type) {
		case *rawbufferv3.RawBuffer:
		case *tlsv3.UpstreamTlsContext:
			if spec.tls, err = parseUpstream(msg); err != nil {
				return nil, wrap(err)
			}
		default:
			return nil, wrap(fmt.Errorf("transport socket %T is not supported upstream", msg))
		}
	}
	for name, a := range c.GetTypedExtensionProtocolOptions() {
		m, err := anypb.UnmarshalNew(a, proto.UnmarshalOptions{})
		if err != nil {
			return nil, wrap(fmt.Errorf("protocol options %s: %w", name, err))
		}
		opts, ok := m.(*httpv3.HttpProtocolOptions)
		if !ok {
			return nil, wrap(fmt.Errorf("protocol options %s of type %T are not supported", name, m))
		}
		if err := only(opts, "explicit_http_config"); err != nil {
			return nil, wrap(err)
		}
		spec.http2 = opts.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil
	}
	return spec, nil
}

func parseEndpoint(le *endpointv3.LbEndpoint, static bool) (endpoint, error) {
	if err := only(le, "endpoint"); err != nil {
		return endpoint{}, err
	}
	ep := le.GetEndpoint()
	if err := only(ep, "address"); err != nil {
		return endpoint{}, err
	}
	switch a := ep.GetAddress().GetAddress().(type) {
	case *corev3.Address_SocketAddress:
		return socketAddress(a.SocketAddress, !static)
	case *corev3.Address_Pipe:
		if err := only(a.Pipe, "path"); err != nil {
			return endpoint{}, err
		}
		return endpoint{network: "unix", address: a.Pipe.GetPath()}, nil
	}
	return endpoint{}, errors.New("endpoint without an address")
}

// socketAddress reads a TCP address; a host name is allowed only where
// Envoy resolves names (DNS clusters).
func socketAddress(sa *corev3.SocketAddress, names bool) (endpoint, error) {
	if err := only(sa, "address", "port_value"); err != nil {
		return endpoint{}, err
	}
	if _, err := netip.ParseAddr(sa.GetAddress()); err != nil && !names {
		return endpoint{}, fmt.Errorf("address %q is not an IP address", sa.GetAddress())
	}
	return endpoint{network: "tcp", address: net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue())))}, nil
}
