// Package peers gives every server replica the same view of the proxies
// and certificates that root rotation's gates wait on. Each replica sees
// only its own SDS streams and its own audit ledger; a leader going by
// those alone could activate a root that proxies connected to another
// replica do not trust yet, or retire one that certificates another
// replica issued still chain to.
//
// A Publisher writes this replica's entry into one ConfigMap (default
// meshca-replicas) in meshca's namespace, under the replica's identity:
// the ROOTCA streams reduced to what the gate reads (identity, node,
// since, ACKed and rejected roots, last NACK) and the certificates its
// ledger knows are valid (SPIFFE ID, root, expiry), as gzipped JSON in
// binaryData, about 25 bytes per proxy. It rewrites the entry every
// Interval and Debounce after this replica's ACKs change, and reads the
// others' entries on the way. Each write is a read-modify-write
// conditional on the resourceVersion read, retried a few times when
// another replica wrote first; it changes only this replica's key and
// removes entries nothing is left of.
//
// Its View merges this replica's live streams and ledger with the other
// entries, as rotation.Proxies and rotation.Ledger:
//
//   - another replica's streams count while its entry is fresh (rewritten
//     within FreshFor): a replica that is gone took its streams along,
//     and its proxies show up where they reconnect;
//   - another replica's certificates count until each expires, fresh or
//     not, since a certificate outlives its issuer. A holder with no
//     stream anywhere blocks activate, as it does on one replica;
//   - an entry that is stale and lists no live certificate is removed by
//     whichever replica notices;
//   - when the ConfigMap cannot be read, or another replica's entry cannot
//     be decoded, Valid fails: the gates stay closed, with that error as
//     the reason, rather than fall back to one replica's view.
//
// What the view does not know: whatever another replica issued or saw
// since its entry was last written (up to Interval, plus Debounce for
// ACKs), and so, for a replica that can no longer write, anything since.
//
// RBAC: get, update and create on ConfigMaps in the namespace. Other
// replicas' changes are noticed by polling, one GET per Interval, which
// the write needs anyway; no list or watch.
package peers
