package ca

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"time"
)

// Issuer is an immutable snapshot of the CA's signing state.
type Issuer struct {
	// Cert signs leaves; Signer holds its private key.
	Cert   *x509.Certificate
	Signer crypto.Signer
	// Chain runs from Cert (first) up to, not including, a root.
	Chain []*x509.Certificate
	// Roots are the trust anchors published in the bundle. Cert chains to
	// one of them; during root rotation there are more.
	Roots []*x509.Certificate
}

// Validity returns the signing certificate's validity.
func (i *Issuer) Validity() Validity {
	return Validity{NotBefore: i.Cert.NotBefore, NotAfter: i.Cert.NotAfter}
}

// Verify checks that the issuer is usable at now: its key matches its
// certificate, the certificate may sign certificates, and it chains to one
// of the roots.
func (i *Issuer) Verify(now time.Time) error {
	if i.Cert == nil || i.Signer == nil || len(i.Roots) == 0 {
		return fmt.Errorf("ca: issuer is incomplete")
	}
	if len(i.Chain) == 0 || !i.Chain[0].Equal(i.Cert) {
		return fmt.Errorf("ca: issuer chain must start with the signing certificate")
	}
	if !publicKeysEqual(i.Signer.Public(), i.Cert.PublicKey) {
		return fmt.Errorf("ca: signing key does not match certificate %q", i.Cert.Subject)
	}
	if !i.Cert.IsCA || i.Cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return fmt.Errorf("ca: certificate %q is not a CA allowed to sign certificates", i.Cert.Subject)
	}
	roots := x509.NewCertPool()
	for _, r := range i.Roots {
		roots.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range i.Chain[1:] {
		inter.AddCert(c)
	}
	if _, err := i.Cert.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return fmt.Errorf("ca: signing certificate %q does not chain to the trust bundle: %w", i.Cert.Subject, err)
	}
	return nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ak, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ak.Equal(b)
}

// EncodeCerts returns certs as concatenated PEM blocks.
func EncodeCerts(certs ...*x509.Certificate) []byte {
	var buf bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return buf.Bytes()
}

// ParseCerts parses every CERTIFICATE block in data and refuses anything
// else, so a key pasted into a certificate file is caught early.
func ParseCerts(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("ca: unexpected PEM block %q where certificates were expected", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("ca: %w", err)
		}
		certs = append(certs, c)
	}
	if len(bytes.TrimSpace(data)) != 0 {
		return nil, fmt.Errorf("ca: trailing data after PEM certificates")
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("ca: no certificates found")
	}
	return certs, nil
}
