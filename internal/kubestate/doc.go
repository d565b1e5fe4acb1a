// Package kubestate keeps meshca server state that all replicas share in
// Kubernetes objects. SecretJournal holds the CA journal in a Secret, as
// ca.JournalStore; SecretFiles holds the disk keystore's encrypted files in
// another, as disk.Files, so every replica can use the CA's keys;
// BundleConfigMap publishes the trust bundle in a ConfigMap.
//
// The journal's revision is the Secret's resourceVersion, so Save is a
// compare-and-swap the API server enforces: a create when nothing is
// stored, an update conditional on the version read otherwise. Of two
// replicas saving from the same revision exactly one wins; the other gets
// ca.ErrJournalConflict and stores nothing.
//
// RBAC: get, create and update on Secrets in the namespace, nothing else.
// get and update can be scoped to the one Secret with resourceNames; create
// cannot, since RBAC does not match a create against a name. To grant no
// create, ship the Secret (empty, or without the journal's key) with the
// installation: Save then only updates it.
//
// Followers notice a new journal by polling Load: one GET of one small
// object, so every few seconds per replica costs the API server next to
// nothing, and the journal changes only when a root or intermediate
// rotates. A watch would need list and watch as well, and a long-lived
// connection per replica, to save a delay of seconds on an event that
// comes every few hours at most.
//
// SecretFiles needs the same verbs on its own Secret: get and update
// (scoped with resourceNames), and create unless the Secret is shipped. A
// keystore write reads the Secret and updates it conditionally, retrying on
// a conflict, so replicas writing different keys at once keep them all.
// Passing the passphrase in another Secret, mounted as a file, keeps the
// sealed keys and what unseals them apart: reading one Secret gives away
// nothing.
package kubestate
