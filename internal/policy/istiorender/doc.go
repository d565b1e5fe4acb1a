// Package istiorender renders the mesh mTLS policy as Istio configuration,
// for clusters whose proxies are programmed by Istio's control plane
// (`meshca mtls render`).
//
// The output, multi-document YAML, holds:
//
//   - a mesh-wide PeerAuthentication named "default" in Istio's root
//     namespace (istio-system unless told otherwise) whose mode is the
//     policy's: STRICT or PERMISSIVE, or DISABLE when mTLS is off;
//   - while mTLS is on, for each excluded name, a DestinationRule whose
//     traffic policy sends plaintext (tls mode DISABLE), so that clients do
//     not originate mTLS to it. A service or namespace of this cluster gets
//     it in its own namespace; any other name (an external host, a pattern
//     wider than a namespace) in the root namespace, from where it applies
//     to every namespace without a rule of its own;
//   - for each excluded name whose pods run sidecars, declared as a
//     Workload, a PeerAuthentication in the pods' namespace that accepts
//     plaintext: on every port (mtls DISABLE) or, when ports are listed,
//     on those only (portLevelMtls, the rest inheriting the mesh's mode).
//     Without it a STRICT mesh would refuse the plaintext its clients now
//     send. An excluded name with no Workload is taken to have no sidecar
//     (the API server, a database outside the mesh): nothing there enforces
//     mTLS, so the DestinationRule is all it needs.
//
// The API versions are security.istio.io/v1beta1 and
// networking.istio.io/v1beta1, which every Istio since 1.5 (security) and
// 1.9 (networking) serves; istio.io/api also ships v1, the storage version
// in current releases, with the same schema.
//
// Istio lets PeerAuthentication select workloads only in their own
// namespace and ignores selectors in the root namespace, so a Workload
// must name a service or a namespace ("*.<namespace>.svc.<cluster domain>")
// outside the root namespace; anything else is refused rather than
// rendered into a policy Istio would silently ignore.
//
// Every object carries the label app.kubernetes.io/managed-by=meshca, so
// `kubectl apply --prune -l app.kubernetes.io/managed-by=meshca` also removes
// the objects of names no longer excluded.
package istiorender
