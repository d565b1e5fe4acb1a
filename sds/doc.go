// Package sds serves Envoy's Secret Discovery Service (v3) so proxies get
// their certificate and trust bundle from meshca and pick up rotations
// without restarts, and node agents the mesh's mTLS policy. Three
// resources, all of type envoy.extensions.transport_sockets.tls.v3.Secret,
// exist:
//
//   - "default": the workload's chain, leaf first and without the root, and
//     its private key (TlsCertificate, PEM);
//   - "ROOTCA": the trust bundle (CertificateValidationContext.trusted_ca,
//     PEM of every root);
//   - "meshca-mtls-policy" (PolicyName): the mesh-wide mTLS policy
//     (GenericSecret.secret, inline bytes of policy.FormatJSON), from which
//     a node agent renders its proxy's listeners and clusters.
//
// The server never signs. Each stream watches a Source for its proxy (Peer)
// and is told when its resources change; Broadcaster is the Source that
// serves everyone the same ones. A Source that has no policy at all returns
// ErrNoPolicy to a stream that asks for it, and the server answers as for
// an unknown name (InvalidArgument), exactly as a server that predates the
// policy resource does; a Snapshot without a policy means "none yet", and
// nothing is sent for it.
//
// Protocol behaviour, for state of the world (StreamSecrets), incremental
// (DeltaSecrets) and unary (FetchSecrets) alike where it applies:
//
//   - A resource's version is a hash of its content (see resource.version,
//     and PolicyVersion), the same on every server. A state-of-the-world
//     version_info lists the version of each resource the proxy has:
//     "default=<v>,ROOTCA=<v>".
//   - Every response carries a fresh nonce. A request echoing the latest
//     nonce ACKs that response, or NACKs it when error_detail is set (or,
//     in state of the world, when its version_info is not the response's);
//     one echoing an older nonce is ignored.
//   - A stream has at most one response awaiting an answer; changes that
//     arrive meanwhile go out, merged, after it. The policy is never merged
//     with a secret: an answer covers a whole response, and a rejected
//     policy must not read as a rejected trust bundle (or the reverse), so
//     it goes out in a response of its own, after the secrets'.
//   - A version goes to a stream once: not again after the proxy ACKed it,
//     and not again after a NACK (the proxy keeps its last ACKed version,
//     which stays recorded; the next change is sent). The exception is a
//     delta subscription, which the protocol says is always answered.
//   - A delta proxy is told a resource was removed when its source
//     withdraws it (a Snapshot without a certificate) or when it reconnects
//     holding a name this server does not serve. State of the world cannot
//     say so; those proxies keep what they have.
//   - A reconnecting proxy that names what it has (version_info, or delta's
//     initial_resource_versions) is not sent it again if it is current, and
//     counts as having ACKed it.
//   - Unknown names, other type URLs and wildcard (nameless) subscriptions
//     end the stream with InvalidArgument.
//
// Server.Acked and Server.Status report, per connected stream, what was
// ACKed, so a root rotation can wait until every proxy trusts the new root;
// Server.PolicyAcked counts the node agents that applied a policy version.
package sds
