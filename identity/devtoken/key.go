package devtoken

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/meshca/meshca/internal/atomicfile"
)

// loadOrCreateKey returns the P-256 signing key stored in path, creating it
// when the file does not exist. An empty path yields an ephemeral key, so
// tokens do not survive a restart. A file that exists but cannot be used is
// an error rather than something to overwrite: replacing it would silently
// invalidate every token already handed out.
func loadOrCreateKey(path string) (key *ecdsa.PrivateKey, created bool, err error) {
	if path != "" {
		data, err := os.ReadFile(path)
		switch {
		case err == nil:
			key, err := parseKey(data)
			if err != nil {
				return nil, false, fmt.Errorf("devtoken: key file %s: %w (remove it to generate a new key)", path, err)
			}
			return key, false, nil
		case !errors.Is(err, fs.ErrNotExist):
			return nil, false, fmt.Errorf("devtoken: reading key file: %w", err)
		}
	}

	key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, false, fmt.Errorf("devtoken: generating key: %w", err)
	}
	if path == "" {
		return key, true, nil
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, false, fmt.Errorf("devtoken: encoding key: %w", err)
	}
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
	if err := writeFileAtomic(path, pemBytes); err != nil {
		return nil, false, fmt.Errorf("devtoken: writing key file: %w", err)
	}
	return key, true, nil
}

// parseKey accepts a PEM-encoded P-256 key in SEC 1 ("EC PRIVATE KEY") or
// PKCS #8 ("PRIVATE KEY") form, the two shapes tools such as openssl write.
func parseKey(data []byte) (*ecdsa.PrivateKey, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block found")
	}
	var key *ecdsa.PrivateKey
	switch block.Type {
	case "EC PRIVATE KEY":
		k, err := x509.ParseECPrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing EC private key: %w", err)
		}
		key = k
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing PKCS #8 private key: %w", err)
		}
		ec, ok := k.(*ecdsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("private key is %T, want an ECDSA P-256 key", k)
		}
		key = ec
	default:
		return nil, fmt.Errorf("PEM block is %q, want \"EC PRIVATE KEY\" or \"PRIVATE KEY\"", block.Type)
	}
	// ES256 is defined over P-256 only.
	if key.Curve != elliptic.P256() {
		return nil, fmt.Errorf("key is on curve %s, want P-256", key.Curve.Params().Name)
	}
	return key, nil
}

// writeFileAtomic writes data to path with mode 0600 so that a crash never
// leaves a truncated key behind: readers see either no file or all of it.
func writeFileAtomic(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return atomicfile.Write(path, data, 0o600)
}
