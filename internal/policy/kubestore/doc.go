// Package kubestore keeps meshca's mTLS policy in a Kubernetes ConfigMap,
// the source of truth that `kubectl edit` and meshca's own API both change,
// and lists the cluster's services so a policy can be planned against them.
//
// Store follows the one ConfigMap with an informer and writes it with
// optimistic concurrency: every Update reads the object, applies the
// change and writes it back with the resourceVersion it read, starting over
// when the API server reports a conflict. An edit that does not parse is
// logged, counted and shown in Status, and the last good policy stays in
// force; a store whose ConfigMap is malformed from the start stays unsynced
// rather than start with a policy nobody wrote. A ConfigMap that does not
// exist is the default policy. Update refuses to edit a malformed ConfigMap,
// since the change it carries would be applied to a guess.
package kubestore
