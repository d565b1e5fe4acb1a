package sdstest

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/ca"
)

// SVID returns the held "default" secret as an X.509-SVID.
func (c *Client) SVID() (*x509svid.SVID, error) {
	sec, ok := c.State().Secrets["default"]
	tc := sec.Secret.GetTlsCertificate()
	if !ok || tc == nil {
		return nil, fmt.Errorf("sdstest: no certificate held")
	}
	svid, err := x509svid.Parse(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
	if err != nil {
		return nil, fmt.Errorf("sdstest: %w", err)
	}
	return svid, nil
}

// Roots returns the held "ROOTCA" secret's certificates.
func (c *Client) Roots() ([]*x509.Certificate, error) {
	sec, ok := c.State().Secrets["ROOTCA"]
	vc := sec.Secret.GetValidationContext()
	if !ok || vc == nil {
		return nil, fmt.Errorf("sdstest: no trust bundle held")
	}
	roots, err := ca.ParseCerts(vc.GetTrustedCa().GetInlineBytes())
	if err != nil {
		return nil, fmt.Errorf("sdstest: trusted_ca: %w", err)
	}
	return roots, nil
}

// TLSConfig returns a configuration for either end of an mTLS connection,
// built as Envoy builds its own from the secrets held: the certificate from
// "default", RootCAs and ClientCAs from "ROOTCA". SPIFFE certificates name
// no host, so the client end skips Go's hostname check and, like the server
// end, accepts any peer whose chain is a valid X.509-SVID up to one of the
// roots (Envoy with a trusted CA and no SAN matcher).
func (c *Client) TLSConfig() (*tls.Config, error) {
	svid, err := c.SVID()
	if err != nil {
		return nil, err
	}
	roots, err := c.Roots()
	if err != nil {
		return nil, err
	}
	cert := tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, x := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, x.Raw)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		Certificates:       []tls.Certificate{cert},
		RootCAs:            pool,
		ClientCAs:          pool,
		ClientAuth:         tls.RequireAndVerifyClientCert,
		InsecureSkipVerify: true, // hostname only; VerifyConnection checks the chain
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return fmt.Errorf("sdstest: peer sent no certificate")
			}
			id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
			if err != nil {
				return fmt.Errorf("sdstest: peer certificate: %w", err)
			}
			bundle := x509bundle.FromX509Authorities(id.TrustDomain(), roots)
			if _, _, err := x509svid.Verify(cs.PeerCertificates, bundle); err != nil {
				return fmt.Errorf("sdstest: peer certificate: %w", err)
			}
			return nil
		},
	}, nil
}
