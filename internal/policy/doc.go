// Package policy is meshca's mesh-wide mTLS policy: whether mutual TLS is
// on, in which mode, and which services are left out of it.
//
// The package has three parts. Policy and its methods are pure: validation,
// normalization and ModeFor, the one question renderers ask. Plan is pure
// too: given a proposed policy and an inventory of services, it names those
// that the policy would cut off. Stores keep the policy durable and live:
// FileStore (a JSON file, for development and single-node installs) here,
// and a ConfigMap store in package kubestore. Both give readers a Source,
// a snapshot plus a channel closed at the next change, and writers Update,
// a read-modify-write that never loses a concurrent edit.
//
// In a ConfigMap the policy is written with Istio 1.0's keys (mtls.enabled,
// mtls.mode, mtlsExcludedServices), so existing Istio configuration reads
// unchanged, or whole as JSON under policy.json, the file store's format;
// see ParseConfigMap.
package policy
