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
)

// TypeURL is the one resource type the server serves.
const TypeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// The secret names Istio's proxies ask for.
const (
	// CertName is the workload's certificate chain and private key.
	CertName = "default"
	// RootsName is the trust bundle.
	RootsName = "ROOTCA"
)

// kind indexes the two resources; per-stream state is a two-element array
// rather than a map.
type kind int

const (
	kindCert kind = iota
	kindRoots
	numKinds
)

var names = [numKinds]string{CertName, RootsName}

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
	// for "ROOTCA"), in order. Equal content has an equal version on every
	// server and across restarts, so a reconnecting proxy's version means
	// the same thing everywhere. The key is not hashed: it is bound to the
	// leaf.
	version string
	any     *anypb.Any
	delta   *discoveryv3.Resource
	// roots are the fingerprints (ca.Fingerprint) of a ROOTCA's roots.
	roots []string

	src []*x509.Certificate // what it was encoded from, for the cache
}

func contentVersion(certs []*x509.Certificate) string {
	h := sha256.New()
	for _, c := range certs {
		h.Write(c.Raw)
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
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

func encode(k kind, s *Snapshot, version string) (*resource, error) {
	secret := &tlsv3.Secret{Name: names[k]}
	r := &resource{kind: k, version: version}
	switch k {
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
	r, err := encode(k, s, v)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	rs := e.recent[k]
	if len(rs) < cacheSize {
		rs = append(rs, nil)
	}
	copy(rs[1:], rs)
	rs[0] = r
	e.recent[k] = rs
	return r, nil
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
