// Package envoyconfig renders the Envoy v3 configuration of one proxy that
// sits next to a meshca node agent, from the mesh-wide mTLS policy.
//
// A Proxy describes the local service (its FQDN, the inbound listener and
// the local application behind it), the destinations the application
// reaches through the proxy, the agent's SDS socket and the trust domain.
// Render turns it into:
//
//   - the inbound Listener: a tls_inspector listener filter, then filter
//     chains chosen by the local service's mode (policy.ModeFor):
//     STRICT has one chain matching transport protocol "tls" whose
//     DownstreamTlsContext requires a client certificate; PERMISSIVE adds a
//     plaintext chain matching "raw_buffer"; DISABLE (mTLS off, or the
//     service excluded) has one plaintext chain matching everything, so an
//     application's own TLS passes through untouched. Every chain ends in a
//     tcp_proxy to the local application's cluster.
//   - one Listener and one Cluster per destination. The cluster originates
//     mTLS (UpstreamTlsContext, SNI the destination's FQDN) unless the
//     policy's mode for that destination is DISABLE.
//
// Certificates never appear in the configuration: every TLS context names
// the SDS secrets "default" (the workload's chain and key) and "ROOTCA" (the
// trust bundle), fetched over gRPC from the agent's Unix socket through the
// static SDS cluster. When a trust domain is given, peers must also present
// a URI SAN under spiffe://<trust domain>/.
//
// Bootstrap returns the static part: the node, the SDS cluster, and LDS and
// CDS read from files (path_config_source with a watched_directory). Envoy
// reloads such a file only when an entry is moved into the watched
// directory, never on an in-place edit, so Write replaces each file by
// writing a temporary file in the same directory and renaming it over the
// old one. It writes CDS before LDS so that new listeners find their
// clusters. The files must exist before Envoy starts.
//
// Every rendered message passes its proto's own validation (ValidateAll),
// and so does every typed_config inside it: Validate unpacks each Any,
// which also proves its type is known.
package envoyconfig
