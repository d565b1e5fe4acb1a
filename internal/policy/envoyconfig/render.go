package envoyconfig

import (
	"fmt"
	"net/netip"
	"strconv"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/sds"
)

// Names of the resources Render produces.
const (
	// InboundListener receives the traffic for the local service.
	InboundListener = "inbound"
	// AppCluster is the local application.
	AppCluster = "inbound|app"
	// SDSCluster reaches the agent's SDS socket.
	SDSCluster = "meshca_sds"
	// ChainMTLS and ChainPlaintext name the inbound filter chains.
	ChainMTLS      = "mtls"
	ChainPlaintext = "plaintext"
)

// Extension names. Envoy picks an extension by the type of its
// typed_config; the names are for people reading the configuration.
const (
	tlsInspectorName = "envoy.filters.listener.tls_inspector"
	tcpProxyName     = "envoy.filters.network.tcp_proxy"
	tlsSocketName    = "envoy.transport_sockets.tls"
	httpOptionsName  = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
)

// Transport protocols as tls_inspector reports them.
const (
	transportTLS = "tls"
	transportRaw = "raw_buffer"
)

// Resources are a proxy's dynamic resources: what LDS and CDS serve.
type Resources struct {
	Listeners []*listenerv3.Listener
	Clusters  []*clusterv3.Cluster
}

// OutboundName is the name of both the listener and the cluster Render
// gives d.
func OutboundName(d Destination) string {
	if n, err := policy.NormalizeFQDN(d.FQDN); err == nil {
		d.FQDN = n
	}
	return clusterName(d)
}

func clusterName(d Destination) string {
	return "outbound|" + strconv.Itoa(int(d.Port)) + "|" + d.FQDN
}

// Render returns the listeners and clusters of p, validated.
func Render(p Proxy) (*Resources, error) {
	p, err := p.validate()
	if err != nil {
		return nil, err
	}
	r := &Resources{}
	in, err := inboundListener(p)
	if err != nil {
		return nil, err
	}
	r.Listeners = append(r.Listeners, in)
	app := staticCluster(AppCluster, p.Service.App.Addr().String(), uint32(p.Service.App.Port()), true)
	r.Clusters = append(r.Clusters, app)
	for _, d := range p.Destinations {
		l, c, err := outbound(p, d)
		if err != nil {
			return nil, err
		}
		r.Listeners = append(r.Listeners, l)
		r.Clusters = append(r.Clusters, c)
	}
	for _, m := range append(protos(r.Listeners), protos(r.Clusters)...) {
		if err := Validate(m); err != nil {
			return nil, err
		}
	}
	return r, nil
}

func inboundListener(p Proxy) (*listenerv3.Listener, error) {
	inspector, err := typed(&tlsinspectorv3.TlsInspector{})
	if err != nil {
		return nil, err
	}
	l := &listenerv3.Listener{
		Name:             InboundListener,
		Address:          socketAddress(p.Service.Listen),
		TrafficDirection: corev3.TrafficDirection_INBOUND,
		ListenerFilters: []*listenerv3.ListenerFilter{{
			Name:       tlsInspectorName,
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: inspector},
		}},
	}
	mode := p.Policy.ModeFor(p.Service.FQDN)
	var chains []*listenerv3.FilterChain
	if mode == policy.ModeStrict || mode == policy.ModePermissive {
		c, err := mtlsChain(p)
		if err != nil {
			return nil, err
		}
		chains = append(chains, c)
	}
	switch mode {
	case policy.ModePermissive:
		c, err := plaintextChain(transportRaw)
		if err != nil {
			return nil, err
		}
		chains = append(chains, c)
	case policy.ModeDisable:
		// No transport match: a client's own TLS is passed through as bytes.
		c, err := plaintextChain("")
		if err != nil {
			return nil, err
		}
		chains = append(chains, c)
	case policy.ModeStrict:
	default:
		return nil, fmt.Errorf("envoyconfig: mode %q for %s", mode, p.Service.FQDN)
	}
	// Where plaintext is allowed, a client that speaks first after the
	// inspector's timeout (server-first protocols) still gets through.
	l.ContinueOnListenerFiltersTimeout = mode != policy.ModeStrict
	l.FilterChains = chains
	return l, nil
}

func mtlsChain(p Proxy) (*listenerv3.FilterChain, error) {
	ctx := &tlsv3.DownstreamTlsContext{
		CommonTlsContext:         commonTLS(p.TrustDomain),
		RequireClientCertificate: wrapperspb.Bool(true),
	}
	sock, err := tlsSocket(ctx)
	if err != nil {
		return nil, err
	}
	proxy, err := tcpProxy(InboundListener+"_"+ChainMTLS, AppCluster)
	if err != nil {
		return nil, err
	}
	return &listenerv3.FilterChain{
		Name:             ChainMTLS,
		FilterChainMatch: &listenerv3.FilterChainMatch{TransportProtocol: transportTLS},
		Filters:          []*listenerv3.Filter{proxy},
		TransportSocket:  sock,
	}, nil
}

// plaintextChain matches transport, or every connection when it is empty.
func plaintextChain(transport string) (*listenerv3.FilterChain, error) {
	proxy, err := tcpProxy(InboundListener+"_"+ChainPlaintext, AppCluster)
	if err != nil {
		return nil, err
	}
	c := &listenerv3.FilterChain{Name: ChainPlaintext, Filters: []*listenerv3.Filter{proxy}}
	if transport != "" {
		c.FilterChainMatch = &listenerv3.FilterChainMatch{TransportProtocol: transport}
	}
	return c, nil
}

func outbound(p Proxy, d Destination) (*listenerv3.Listener, *clusterv3.Cluster, error) {
	name := clusterName(d)
	proxy, err := tcpProxy(name, name)
	if err != nil {
		return nil, nil, err
	}
	l := &listenerv3.Listener{
		Name:             name,
		Address:          socketAddress(d.Listen),
		TrafficDirection: corev3.TrafficDirection_OUTBOUND,
		FilterChains:     []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{proxy}}},
	}
	_, err = netip.ParseAddr(d.Address)
	c := staticCluster(name, d.Address, uint32(d.Port), err == nil)
	if p.Policy.ModeFor(d.FQDN) != policy.ModeDisable {
		sock, err := tlsSocket(&tlsv3.UpstreamTlsContext{CommonTlsContext: commonTLS(p.TrustDomain), Sni: d.FQDN})
		if err != nil {
			return nil, nil, err
		}
		c.TransportSocket = sock
	}
	return l, c, nil
}

// commonTLS presents "default" and validates peers with "ROOTCA", both
// from the agent.
func commonTLS(td spiffeid.TrustDomain) *tlsv3.CommonTlsContext {
	c := &tlsv3.CommonTlsContext{
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsSecret(sds.CertName)},
	}
	if td.IsZero() {
		c.ValidationContextType = &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{
			ValidationContextSdsSecretConfig: sdsSecret(sds.RootsName),
		}
		return c
	}
	c.ValidationContextType = &tlsv3.CommonTlsContext_CombinedValidationContext{
		CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
			DefaultValidationContext: &tlsv3.CertificateValidationContext{
				MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{
					SanType: tlsv3.SubjectAltNameMatcher_URI,
					Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{
						Prefix: td.IDString() + "/",
					}},
				}},
			},
			ValidationContextSdsSecretConfig: sdsSecret(sds.RootsName),
		},
	}
	return c
}

func sdsSecret(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{
		Name: name,
		SdsConfig: &corev3.ConfigSource{
			ResourceApiVersion: corev3.ApiVersion_V3,
			ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{ApiConfigSource: &corev3.ApiConfigSource{
				ApiType:             corev3.ApiConfigSource_GRPC,
				TransportApiVersion: corev3.ApiVersion_V3,
				GrpcServices: []*corev3.GrpcService{{
					TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{
						ClusterName: SDSCluster,
					}},
				}},
			}},
		},
	}
}

func tlsSocket(ctx proto.Message) (*corev3.TransportSocket, error) {
	a, err := typed(ctx)
	if err != nil {
		return nil, err
	}
	return &corev3.TransportSocket{
		Name:       tlsSocketName,
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: a},
	}, nil
}

func tcpProxy(statPrefix, cluster string) (*listenerv3.Filter, error) {
	a, err := typed(&tcpproxyv3.TcpProxy{
		StatPrefix:       statPrefix,
		ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster},
	})
	if err != nil {
		return nil, err
	}
	return &listenerv3.Filter{Name: tcpProxyName, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: a}}, nil
}

// staticCluster is a cluster of one endpoint: STATIC for an IP address,
// STRICT_DNS for a name.
func staticCluster(name, host string, port uint32, isIP bool) *clusterv3.Cluster {
	typ := clusterv3.Cluster_STATIC
	if !isIP {
		typ = clusterv3.Cluster_STRICT_DNS
	}
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: typ},
		LoadAssignment:       loadAssignment(name, hostAddress(host, port)),
	}
}

func loadAssignment(cluster string, addr *corev3.Address) *endpointv3.ClusterLoadAssignment {
	return &endpointv3.ClusterLoadAssignment{
		ClusterName: cluster,
		Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: addr}},
			}},
		}},
	}
}

func socketAddress(ap netip.AddrPort) *corev3.Address {
	return hostAddress(ap.Addr().String(), uint32(ap.Port()))
}

// hostAddress is a TCP address: an IP address, or a name for a DNS cluster.
func hostAddress(host string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address:       host,
		PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

func typed(m proto.Message) (*anypb.Any, error) {
	a := &anypb.Any{}
	// Deterministic, so equal configurations serialise to equal bytes.
	if err := anypb.MarshalFrom(a, m, proto.MarshalOptions{Deterministic: true}); err != nil {
		return nil, fmt.Errorf("envoyconfig: %w", err)
	}
	return a, nil
}
