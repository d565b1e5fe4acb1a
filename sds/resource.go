package sds

import (
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"slices"
	"sync"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/policy"
)

// TypeURL is the one resource type the server serves.
const TypeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// The resource names. The first two are the secrets Istio's proxies ask
// for; the third is meshca's own, for node agents.
const (
	// CertName is the workload's certificate chain and private key.
	CertName = "default"
	// RootsName is the trust bundle.
	RootsName = "ROOTCA"
	// PolicyName is the mesh-wide mTLS policy: a generic_secret whose
	// inline bytes are policy.FormatJSON. Node agents render the proxy's
	// configuration from it; Envoy itself never asks for it.
	PolicyName = "meshca-mtls-policy"
)

// kind indexes the resources; per-stream state is an array rather than a
// map.
type kind int

const (
	kindCert kind = iota
	kindRoots
	kindPolicy
	numKinds
)

var names = [numKinds]string{CertName, RootsName, PolicyName}

// isSecret reports whether k is one of the TLS secrets Envoy consumes, as
// opposed to the policy.
func (k kind) isSecret() bool { return k != kindPolicy }

func kindOf(name string) (kind, bool) {
	for k, n := range names {
		if n == name {
			return kind(k), true
		}
	}
	return 0, false
}

// kindsOf returns which resources list names; a name this server does not
// serve is the proxy's mistake.
func kindsOf(list []string) ([numKinds]bool, error) {
	var want [numKinds]bool
	for _, n := range list {
		k, ok := kindOf(n)
		if !ok {
			return want, unknownResource(n)
		}
		want[k] = true
	}
	return want, nil
}

// resource is one secret encoded at one version. It is immutable and shared
// by every stream that serves it: a bundle change is encoded once, not once
// per stream.
type resource struct {
	kind kind
	// version is a content hash: the first 64 bits, in hex, of the SHA-256
	// over the DER of each certificate (the chain for "default", the roots
	// for "ROOTCA"), in order, or over the policy's JSON. Equal content has
	// an equal version on every server and across restarts, so a
	// reconnecting proxy's version means the same thing everywhere. The key
	// is not hashed: it is bound to the leaf.
	version string
	any     *anypb.Any
	delta   *discoveryv3.Resource
	// roots are the fingerprints (ca.Fingerprint) of a ROOTCA's roots.
	roots []string

	// What it was encoded from, for the cache.
	src []*x509.Certificate
	pol *policy.Policy
}

func contentVersion(certs []*x509.Certificate) string {
	h := sha256.New()
	for _, c := range certs {
		h.Write(c.Raw)
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

func bytesVersion(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// PolicyVersion is the version the server gives p's PolicyName resource,
// so that an agent can name the policy it applied the way the server's
// ACK accounting (PolicyAcked) does.
func PolicyVersion(p policy.Policy) (string, error) {
	b, err := policy.FormatJSON(p)
	if err != nil {
		return "", fmt.Errorf("sds: %w", err)
	}
	return bytesVersion(b), nil
}

// encodeKey returns key as PKCS #8 PEM after checking that it belongs to
// leaf, so a mismatched pair is never served.
func encodeKey(key crypto.Signer, leaf *x509.Certificate) ([]byte, error) {
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return nil, fmt.Errorf("sds: private key does not match the leaf certificate")
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("sds: private key cannot be exported to the proxy: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func encode(k kind, s *Snapshot, version string, policyJSON []byte) (*resource, error) {
	secret := &tlsv3.Secret{Name: names[k]}
	r := &resource{kind: k, version: version}
	switch k {
	case kindPolicy:
		r.pol = s.Policy
		secret.Type = &tlsv3.Secret_GenericSecret{GenericSecret: &tlsv3.GenericSecret{Secret: inline(policyJSON)}}
	case kindCert:
		key, err := encodeKey(s.Key, s.Chain[0])
		if err != nil {
			return nil, err
		}
		r.src = s.Chain
		secret.Type = &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: inline(ca.EncodeCerts(s.Chain...)),
			PrivateKey:       inline(key),
		}}
	case kindRoots:
		r.src = s.Roots
		for _, c := range s.Roots {
			r.roots = append(r.roots, ca.Fingerprint(c))
		}
		secret.Type = &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: inline(ca.EncodeCerts(s.Roots...)),
		}}
	}
	a, err := anypb.New(secret)
	if err != nil {
		return nil, fmt.Errorf("sds: encode %s: %w", names[k], err)
	}
	r.any = a
	r.delta = &discoveryv3.Resource{Name: names[k], Version: version, Resource: a}
	return r, nil
}

func inline(b []byte) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b}}
}

// cacheSize bounds the encodings kept per kind. During a root rotation a
// few bundles are live at once; a per-proxy source misses the cache for
// "default" anyway.
const cacheSize = 4

// encoder turns snapshots into resources, reusing recent encodings.
type encoder struct {
	mu     sync.Mutex
	recent [numKinds][]*resource // most recent first
}

// get returns the resource of kind k in s, or nil when s has none.
func (e *encoder) get(k kind, s *Snapshot) (*resource, error) {
	if k == kindPolicy {
		return e.getPolicy(s)
	}
	certs := s.Roots
	if k == kindCert {
		certs = s.Chain
	}
	if len(certs) == 0 {
		return nil, nil
	}
	// Fast path: the same certificates (by pointer), as when every stream
	// shares one snapshot or sources share the CA's roots.
	if r := e.find(k, func(r *resource) bool { return slices.Equal(r.src, certs) }); r != nil {
		return r, nil
	}
	v := contentVersion(certs)
	if r := e.find(k, func(r *resource) bool { return r.version == v }); r != nil {
		return r, nil
	}
	r, err := encode(k, s, v, nil)
	if err != nil {
		return nil, err
	}
	e.remember(r)
	return r, nil
}

// getPolicy is get for the policy: a source shares one *Policy among its
// watchers, so the pointer usually finds the encoding without formatting
// the JSON again.
func (e *encoder) getPolicy(s *Snapshot) (*resource, error) {
	if s.Policy == nil {
		return nil, nil
	}
	if r := e.find(kindPolicy, func(r *resource) bool { return r.pol == s.Policy }); r != nil {
		return r, nil
	}
	b, err := policy.FormatJSON(*s.Policy)
	if err != nil {
		return nil, fmt.Errorf("sds: encode %s: %w", PolicyName, err)
	}
	v := bytesVersion(b)
	if r := e.find(kindPolicy, func(r *resource) bool { return r.version == v }); r != nil {
		return r, nil
	}
	r, err := encode(kindPolicy, s, v, b)
	if err != nil {
		return nil, err
	}
	e.remember(r)
	return r, nil
}

func (e *encoder) remember(r *resource) {
	e.mu.Lock()
	defer e.mu.Unlock()
	rs := e.recent[r.kind]
	if len(rs) < cacheSize {
		rs = append(rs, nil)
	}
	copy(rs[1:], rs)
	rs[0] = r
	e.recent[r.kind] = rs
}

func (e *encoder) find(k kind, match func(*resource) bool) *resource {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, r := range e.recent[k] {
		if match(r) {
			return r
		}
	}
	return nil
}
