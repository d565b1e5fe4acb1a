// Package envoysim is a small data plane that runs a proxy's Envoy v3
// configuration, for tests on machines where Envoy cannot be installed. It
// reads the same files Envoy would (a bootstrap, and the LDS and CDS files
// it names), fetches secrets from the same SDS socket with an Envoy-like
// client (sds/sdstest), and serves the listeners over real sockets.
//
// # What it implements
//
// Bootstrap: node.id (sent to SDS); static_resources.clusters (used for
// SDS, and reachable from tcp_proxy); dynamic_resources.lds_config and
// cds_config as path_config_source, with or without watched_directory, in
// JSON. The files must exist when Run starts. Every message and every
// typed_config passes its proto's validation (envoyconfig.Validate), as
// Envoy requires.
//
// File updates: the simulator reads both files every Config.PollInterval
// on its clock (CDS first) and applies a file whose bytes changed. Envoy
// instead reacts to a file being moved into place; since writers must move
// files in anyway, polling sees every such update, one poll later. LDS and
// CDS are applied independently; a file that fails to parse or uses
// something unsupported is refused as a whole, the previous one stays in
// force and Status reports why. Envoy too keeps the last good
// configuration, but may accept part of an update and reject the rest.
//
// Listeners: socket_address (IP, port; port 0 binds any free port, which
// Status reports); the envoy.filters.listener.tls_inspector filter with no
// options; listener_filters_timeout (default 15s, on the simulator's clock)
// and continue_on_listener_filters_timeout; filter_chains and
// default_filter_chain whose filter_chain_match has at most
// transport_protocol; exactly one network filter, tcp_proxy with
// stat_prefix and cluster; and a raw_buffer or TLS transport socket.
// traffic_direction and stat_prefix are accepted and ignored.
//
// Chain selection: a chain whose transport_protocol equals the detected one
// wins, then a chain with none, then the default chain; otherwise the
// connection is closed. Detection reads only the TLS record header (a
// handshake record of version 3.x is "tls", anything else "raw_buffer");
// tls_inspector parses the whole ClientHello, and also extracts SNI and
// ALPN, which the simulator neither extracts nor matches on.
//
// A listener whose address is unchanged keeps its socket across updates
// and applies the new chains to new connections; a listener removed or
// moved is closed. Open connections keep running until either side ends
// them, where Envoy drains them and closes them after its drain time.
//
// Clusters: STATIC, STRICT_DNS and LOGICAL_DNS, all resolved by Go's
// resolver at connect time, rather than by Envoy's DNS refresh; endpoints
// from load_assignment (socket_address or pipe) taken in round robin, with
// no health checking or outlier detection; connect_timeout (default 5s, on
// the simulator's clock); a raw_buffer or UpstreamTlsContext transport
// socket; typed_extension_protocol_options holding HttpProtocolOptions,
// used only to check that an SDS cluster speaks HTTP/2. A connection that
// cannot reach its upstream is closed, as tcp_proxy does with one connect
// attempt.
//
// TLS: a CommonTlsContext with one certificate from SDS
// (tls_certificate_sds_secret_configs) and validation from SDS, either
// validation_context_sds_secret_config or combined_validation_context whose
// default_validation_context may hold match_typed_subject_alt_names (types
// URI, DNS, EMAIL, IP_ADDRESS; exact, prefix, suffix or contains matchers,
// ignore_case). The peer chain must verify up to the SDS trusted_ca at the
// simulator's clock's time; extended key usages are not checked, as Envoy
// does not by default; then, when there are matchers, one must match one
// of the leaf's SANs. DownstreamTlsContext.require_client_certificate is
// honoured: with validation, a client certificate is always requested and
// checked when sent; without, a required one is not checked.
// UpstreamTlsContext.sni is sent, and no host name is checked, as with
// Envoy. TLS 1.2 is the minimum; versions, ciphers and ALPN are
// Go's defaults, not Envoy's.
//
// SDS: each (cluster, GRPC or DELTA_GRPC) pair is one stream to a static
// cluster with a single pipe endpoint, run by sdstest.Client, which ACKs
// and NACKs as Envoy does. Secrets are parsed when they arrive and every
// handshake reads the latest ones (GetConfigForClient on the server side,
// at connect time on the client side), so a rotation applies from the next
// connection. A stream that ends is reopened after Config.RetryInterval on
// the simulator's clock, where Envoy backs off exponentially. Names are
// subscribed as configurations come to need them and never unsubscribed.
// Until a secret arrives, handshakes that need it fail; Envoy instead keeps
// such a listener or cluster warming, not serving at all.
//
// Anything else, a populated field the simulator does not implement
// included, refuses the configuration that holds it, so that a test never
// passes by silently ignoring what Envoy would do.
//
// # Statistics
//
// Status.Counters counts, with names after Envoy's, but keyed by listener
// and chain names rather than addresses and stat prefixes:
//
//	listener.<listener>.downstream_cx_total
//	listener.<listener>.downstream_listener_filter_error  (inspection gave up)
//	listener.<listener>.no_filter_chain_match
//	listener.<listener>.<chain>.downstream_cx_total
//	listener.<listener>.<chain>.ssl.handshake_error
//	listener.<listener>.<chain>.no_cluster
//	cluster.<cluster>.upstream_cx_total
//	cluster.<cluster>.upstream_cx_connect_fail
//	cluster.<cluster>.upstream_cx_none_healthy
//	cluster.<cluster>.ssl.handshake_error
//
// <chain> is the filter chain's name, "chain<i>" for an unnamed one, or
// "default".
package envoysim
