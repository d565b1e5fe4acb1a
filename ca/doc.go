// Package ca is meshca's certificate authority: it holds the current root and
// signing intermediate, issues short-lived X.509-SVIDs to authenticated
// identities, and re-verifies every chain it issues before handing it out.
//
// Issuance is split into steps that can each be tested alone: pure template
// builders (template.go), CSR checks (csr.go), the TTL policy (ttl.go),
// signing through a crypto.Signer and verification (authority.go). CA state
// lives in a small journal in the data directory (journal.go) or, for
// operators who bring their own CA, in Istio-style cacerts files
// (pluggedin.go) that are reloaded when they change.
package ca
