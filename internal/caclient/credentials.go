package caclient

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/atomicfile"
)

// File names written by Credentials.Write. They match what Istio's agent
// writes to its output directory, so tooling that reads those files works
// unchanged.
const (
	KeyFile   = "key.pem"
	ChainFile = "cert-chain.pem"
	RootFile  = "root-cert.pem"
)

// Credentials are a verified workload identity.
type Credentials struct {
	// ID is the SPIFFE ID the server granted.
	ID spiffeid.ID
	// Key is the private key, generated in this process.
	Key crypto.Signer
	// Chain runs from the leaf up to, not including, the root.
	Chain []*x509.Certificate
	// Roots is the trust bundle: the configured roots plus the root the
	// server sent, without duplicates.
	Roots []*x509.Certificate
	// NotAfter is the earliest expiry in Chain, after which the credentials
	// are useless; renew before it.
	NotAfter time.Time
}

// TLSCertificate returns the credentials for use in a tls.Config.
func (c *Credentials) TLSCertificate() tls.Certificate {
	raw := make([][]byte, len(c.Chain))
	for i, cert := range c.Chain {
		raw[i] = cert.Raw
	}
	return tls.Certificate{Certificate: raw, PrivateKey: c.Key, Leaf: c.Chain[0]}
}

// Write stores the credentials in dir as key.pem (PKCS#8, 0600),
// cert-chain.pem (leaf and intermediates, 0644) and root-cert.pem (0644),
// creating dir with mode 0700 if it is missing.
//
// Each file is replaced atomically. The three together are not, so they are
// written in the order a reader watching cert-chain.pem needs: the roots
// first, so a new chain never arrives before the root that validates it, and
// the chain last, so once it changes the matching key is already in place.
func (c *Credentials) Write(dir string) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(c.Key)
	if err != nil {
		return fmt.Errorf("caclient: marshal private key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("caclient: %w", err)
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{RootFile, ca.EncodeCerts(c.Roots...), 0o644},
		{KeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600},
		{ChainFile, ca.EncodeCerts(c.Chain...), 0o644},
	}
	for _, f := range files {
		if err := atomicfile.Write(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return fmt.Errorf("caclient: %w", err)
		}
	}
	return nil
}

// LoadBundle reads a PEM file of trust anchors, such as root-cert.pem.
func LoadBundle(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("caclient: %w", err)
	}
	certs, err := ca.ParseCerts(data)
	if err != nil {
		return nil, fmt.Errorf("caclient: trust bundle %s: %w", path, err)
	}
	return certs, nil
}
