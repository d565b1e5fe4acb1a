package ca

import (
	"crypto"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The template builders are pure: same inputs, same template. Everything
// random or time-dependent (serial, validity) is passed in.

// Validity is a certificate's lifetime.
type Validity struct {
	NotBefore, NotAfter time.Time
}

// RootTemplate describes a self-signed root for trust domain td.
func RootTemplate(td spiffeid.TrustDomain, pub crypto.PublicKey, serial *big.Int, v Validity) (*x509.Certificate, error) {
	return caTemplate(td, "root", pub, serial, v, 1)
}

// IntermediateTemplate describes a signing CA beneath a root. MaxPathLen 0:
// it may sign leaves only.
func IntermediateTemplate(td spiffeid.TrustDomain, pub crypto.PublicKey, serial *big.Int, v Validity) (*x509.Certificate, error) {
	return caTemplate(td, "intermediate", pub, serial, v, 0)
}

func caTemplate(td spiffeid.TrustDomain, role string, pub crypto.PublicKey, serial *big.Int, v Validity, maxPathLen int) (*x509.Certificate, error) {
	ski, err := subjectKeyID(pub)
	if err != nil {
		return nil, err
	}
	return &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{"meshca"},
			CommonName:   fmt.Sprintf("meshca %s CA %.8s", role, fmt.Sprintf("%032x", serial)),
		},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             v.NotBefore,
		NotAfter:              v.NotAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            maxPathLen,
		MaxPathLenZero:        maxPathLen == 0,
		SubjectKeyId:          ski,
	}, nil
}

// LeafTemplate describes an X.509-SVID: exactly one URI SAN (the SPIFFE ID),
// an empty subject (so Go marks the SAN extension critical, as RFC 5280
// requires), not a CA, usable for both ends of mTLS.
func LeafTemplate(id spiffeid.ID, pub crypto.PublicKey, serial *big.Int, v Validity) (*x509.Certificate, error) {
	if id.IsZero() {
		return nil, fmt.Errorf("ca: leaf template: empty SPIFFE ID")
	}
	ku := x509.KeyUsageDigitalSignature
	if _, ok := pub.(*rsa.PublicKey); ok {
		ku |= x509.KeyUsageKeyEncipherment
	}
	return &x509.Certificate{
		SerialNumber:          serial,
		URIs:                  []*url.URL{id.URL()},
		NotBefore:             v.NotBefore,
		NotAfter:              v.NotAfter,
		KeyUsage:              ku,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
	}, nil
}

// ServingTemplate describes meshca's own TLS serving certificate: the
// server's SPIFFE ID plus the DNS names and IPs clients dial.
func ServingTemplate(id spiffeid.ID, dnsNames []string, ips []net.IP, pub crypto.PublicKey, serial *big.Int, v Validity) (*x509.Certificate, error) {
	t, err := LeafTemplate(id, pub, serial, v)
	if err != nil {
		return nil, err
	}
	t.DNSNames = append([]string(nil), dnsNames...)
	t.IPAddresses = append([]net.IP(nil), ips...)
	return t, nil
}

// subjectKeyID follows RFC 5280 §4.2.1.2 method 1: SHA-1 of the public key
// bit string. It is an identifier, not a security control.
func subjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("ca: marshal public key: %w", err)
	}
	var spki struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &spki); err != nil {
		return nil, fmt.Errorf("ca: parse public key: %w", err)
	}
	sum := sha1.Sum(spki.PublicKey.Bytes)
	return sum[:], nil
}
