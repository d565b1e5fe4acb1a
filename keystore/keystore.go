// Package keystore holds the CA's signing keys and hands them out as
// crypto.Signers, so the private key material never has to leave its backend.
//
// Backends live in sub-packages (disk, memory, and later vault); every one of
// them must pass the conformance suite in keystoretest.
package keystore

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"regexp"
)

// KeyType names a key algorithm. The names match Vault Transit's key types so
// that configuration reads the same for every backend.
type KeyType string

// Supported key types.
const (
	ECDSAP256 KeyType = "ecdsa-p256"
	ECDSAP384 KeyType = "ecdsa-p384"
	RSA2048   KeyType = "rsa-2048"
	RSA3072   KeyType = "rsa-3072"
	RSA4096   KeyType = "rsa-4096"
)

// KeyTypes lists every supported key type, in order of preference.
var KeyTypes = []KeyType{ECDSAP256, ECDSAP384, RSA2048, RSA3072, RSA4096}

// Store creates and loads signing keys by ID.
type Store interface {
	// GenerateKey creates a key of type kt under id, atomically replacing any
	// key already stored under that id, and returns its signer.
	GenerateKey(ctx context.Context, id string, kt KeyType) (crypto.Signer, error)
	// GetKey returns the signer stored under id, or an error matching
	// ErrNotFound.
	GetKey(ctx context.Context, id string) (crypto.Signer, error)
}

// Deleter is implemented by stores that can remove keys.
type Deleter interface {
	DeleteKey(ctx context.Context, id string) error
}

var (
	// ErrNotFound reports that no key is stored under the requested id.
	ErrNotFound = errors.New("keystore: key not found")
	// ErrUnsupportedKeyType reports a key type this backend cannot create.
	ErrUnsupportedKeyType = errors.New("keystore: unsupported key type")
	// ErrInvalidID reports a key id that is not a safe, short name.
	ErrInvalidID = errors.New("keystore: invalid key id")
	// ErrUnavailable is matched by a remote backend's errors that say it
	// cannot answer now (down, unreachable, sealed) rather than that the
	// request is wrong: the operation may succeed if retried later.
	ErrUnavailable = errors.New("keystore: backend unavailable")
)

// idPattern keeps ids usable as file names and Vault key names alike.
var idPattern = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}$`)

// ValidateID reports whether id is an acceptable key id.
func ValidateID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("%w: %q (want 1-128 of [a-zA-Z0-9._-], starting alphanumeric)", ErrInvalidID, id)
	}
	return nil
}

// ParseKeyType parses a key type name such as "ecdsa-p256".
func ParseKeyType(s string) (KeyType, error) {
	for _, kt := range KeyTypes {
		if string(kt) == s {
			return kt, nil
		}
	}
	return "", fmt.Errorf("%w: %q", ErrUnsupportedKeyType, s)
}

// Generate creates a software key of type kt. Backends that hold keys in
// process memory or on disk use it; remote backends create keys remotely.
func Generate(kt KeyType) (crypto.Signer, error) {
	switch kt {
	case ECDSAP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case ECDSAP384:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case RSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	case RSA3072:
		return rsa.GenerateKey(rand.Reader, 3072)
	case RSA4096:
		return rsa.GenerateKey(rand.Reader, 4096)
	default:
		return nil, fmt.Errorf("%w: %q", ErrUnsupportedKeyType, kt)
	}
}
