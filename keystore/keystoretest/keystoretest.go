// Package keystoretest is the conformance suite for keystore.Store backends.
//
// The CA treats every backend alike, so every backend must behave alike: each
// one calls Run from its tests, and a behaviour the CA relies on belongs here
// rather than in a single backend's tests.
package keystoretest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	_ "crypto/sha256" // registers crypto.SHA256
	_ "crypto/sha512" // registers crypto.SHA384
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshca/meshca/keystore"
)

// Run runs the suite. newStore must return a new, empty store for each call;
// the suite calls it once per subtest.
func Run(t *testing.T, newStore func(t *testing.T) keystore.Store) {
	t.Run("KeyTypes", func(t *testing.T) {
		for _, kt := range keystore.KeyTypes {
			t.Run(string(kt), func(t *testing.T) { testKeyType(t, newStore(t), kt) })
		}
	})
	t.Run("GetKeyUnknownID", func(t *testing.T) { testGetKeyUnknownID(t, newStore(t)) })
	t.Run("Replace", func(t *testing.T) { testReplace(t, newStore) })
	t.Run("InvalidID", func(t *testing.T) { testInvalidID(t, newStore(t)) })
	t.Run("ValidID", func(t *testing.T) { testValidID(t, newStore(t)) })
	t.Run("UnsupportedKeyType", func(t *testing.T) { testUnsupportedKeyType(t, newStore(t)) })
	t.Run("Concurrent", func(t *testing.T) { testConcurrent(t, newStore(t)) })
	// Deletion is optional, so only stores that offer it are tested for it.
	if _, ok := newStore(t).(keystore.Deleter); ok {
		t.Run("Delete", func(t *testing.T) { testDelete(t, newStore(t)) })
	}
}

// keySpec is what a key of each type must look like.
type keySpec struct {
	curve elliptic.Curve // ECDSA only
	bits  int            // RSA only
	hash  crypto.Hash    // digest to sign
}

var keySpecs = map[keystore.KeyType]keySpec{
	keystore.ECDSAP256: {curve: elliptic.P256(), hash: crypto.SHA256},
	keystore.ECDSAP384: {curve: elliptic.P384(), hash: crypto.SHA384},
	keystore.RSA2048:   {bits: 2048, hash: crypto.SHA256},
	keystore.RSA3072:   {bits: 3072, hash: crypto.SHA256},
	keystore.RSA4096:   {bits: 4096, hash: crypto.SHA256},
}

func specFor(t *testing.T, kt keystore.KeyType) keySpec {
	t.Helper()
	spec, ok := keySpecs[kt]
	if !ok {
		t.Fatalf("keystoretest has no expectations for key type %q; add them to keySpecs", kt)
	}
	return spec
}

// testKeyType generates one key of type kt and runs every check on it, so
// that slow types such as RSA 4096 are generated only once.
func testKeyType(t *testing.T, s keystore.Store, kt keystore.KeyType) {
	id := "key-" + string(kt)
	signer, err := s.GenerateKey(t.Context(), id, kt)
	if err != nil {
		t.Fatalf("GenerateKey(%q, %q): %v", id, kt, err)
	}
	checkPublicKey(t, signer.Public(), kt)

	got, err := s.GetKey(t.Context(), id)
	if err != nil {
		t.Fatalf("GetKey(%q): %v", id, err)
	}
	if !samePublicKey(got.Public(), signer.Public()) {
		t.Fatalf("GetKey(%q) returned a different public key than GenerateKey", id)
	}
	// Signatures from either signer must verify under the generated key.
	checkSignatures(t, signer, signer.Public(), kt)
	checkSignatures(t, got, signer.Public(), kt)
	checkCertificate(t, got, kt)
}

func testGetKeyUnknownID(t *testing.T, s keystore.Store) {
	if _, err := s.GenerateKey(t.Context(), "known", keystore.ECDSAP256); err != nil {
		t.Fatalf("GenerateKey: %v", err)
	}
	_, err := s.GetKey(t.Context(), "unknown")
	if !errors.Is(err, keystore.ErrNotFound) {
		t.Fatalf("GetKey(%q) = %v, want an error matching keystore.ErrNotFound", "unknown", err)
	}
}

func testReplace(t *testing.T, newStore func(t *testing.T) keystore.Store) {
	for _, tt := range []struct{ from, to keystore.KeyType }{
		{keystore.ECDSAP256, keystore.ECDSAP256},
		{keystore.ECDSAP256, keystore.ECDSAP384},
		{keystore.RSA2048, keystore.ECDSAP256},
	} {
		t.Run(fmt.Sprintf("%s_to_%s", tt.from, tt.to), func(t *testing.T) {
			s := newStore(t)
			const id = "replaced"
			old, err := s.GenerateKey(t.Context(), id, tt.from)
			if err != nil {
				t.Fatalf("GenerateKey(%q, %q): %v", id, tt.from, err)
			}
			// Load the old key first, so a backend that caches must notice
			// the replacement.
			if _, err := s.GetKey(t.Context(), id); err != nil {
				t.Fatalf("GetKey(%q): %v", id, err)
			}
			replacement, err := s.GenerateKey(t.Context(), id, tt.to)
			if err != nil {
				t.Fatalf("GenerateKey(%q, %q) over an existing key: %v", id, tt.to, err)
			}
			if samePublicKey(replacement.Public(), old.Public()) {
				t.Fatal("replacing a key returned the old key")
			}
			checkPublicKey(t, replacement.Public(), tt.to)
			got, err := s.GetKey(t.Context(), id)
			if err != nil {
				t.Fatalf("GetKey(%q): %v", id, err)
			}
			if !samePublicKey(got.Public(), replacement.Public()) {
				t.Fatal("GetKey after replacement did not return the new key")
			}
		})
	}
}

var invalidIDs = []struct{ name, id string }{
	{"empty", ""},
	{"parent", "../x"},
	{"slash", "a/b"},
	{"backslash", `a\b`},
	{"leading dot", ".hidden"},
	{"space", "a b"},
	{"NUL", "a\x00b"},
	{"too long", strings.Repeat("a", 129)},
}

func testInvalidID(t *testing.T, s keystore.Store) {
	d, canDelete := s.(keystore.Deleter)
	for _, tt := range invalidIDs {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := s.GenerateKey(t.Context(), tt.id, keystore.ECDSAP256); !errors.Is(err, keystore.ErrInvalidID) {
				t.Errorf("GenerateKey(%q) = %v, want an error matching keystore.ErrInvalidID", tt.id, err)
			}
			if _, err := s.GetKey(t.Context(), tt.id); !errors.Is(err, keystore.ErrInvalidID) {
				t.Errorf("GetKey(%q) = %v, want an error matching keystore.ErrInvalidID", tt.id, err)
			}
			if canDelete {
				if err := d.DeleteKey(t.Context(), tt.id); !errors.Is(err, keystore.ErrInvalidID) {
					t.Errorf("DeleteKey(%q) = %v, want an error matching keystore.ErrInvalidID", tt.id, err)
				}
			}
		})
	}
}

func testValidID(t *testing.T, s keystore.Store) {
	for _, id := range []string{"a", "A.b_c-1", "ca.2025-01", strings.Repeat("a", 128)} {
		signer, err := s.GenerateKey(t.Context(), id, keystore.ECDSAP256)
		if err != nil {
			t.Fatalf("GenerateKey(%q): %v", id, err)
		}
		got, err := s.GetKey(t.Context(), id)
		if err != nil {
			t.Fatalf("GetKey(%q): %v", id, err)
		}
		if !samePublicKey(got.Public(), signer.Public()) {
			t.Fatalf("GetKey(%q) returned a different key", id)
		}
	}
}

func testUnsupportedKeyType(t *testing.T, s keystore.Store) {
	const kept = "kept"
	orig, err := s.GenerateKey(t.Context(), kept, keystore.ECDSAP256)
	if err != nil {
		t.Fatalf("GenerateKey: %v", err)
	}
	for _, kt := range []keystore.KeyType{"", "ed25519", "rsa-1024", "ecdsa-p521", "ECDSA-P256"} {
		t.Run(fmt.Sprintf("%q", kt), func(t *testing.T) {
			if _, err := s.GenerateKey(t.Context(), "new", kt); !errors.Is(err, keystore.ErrUnsupportedKeyType) {
				t.Errorf("GenerateKey(%q) = %v, want an error matching keystore.ErrUnsupportedKeyType", kt, err)
			}
			if _, err := s.GetKey(t.Context(), "new"); !errors.Is(err, keystore.ErrNotFound) {
				t.Errorf("GetKey after a failed GenerateKey = %v, want keystore.ErrNotFound", err)
			}
			// A failed replacement must not cost the existing key.
			if _, err := s.GenerateKey(t.Context(), kept, kt); !errors.Is(err, keystore.ErrUnsupportedKeyType) {
				t.Errorf("GenerateKey(%q) over an existing key = %v, want keystore.ErrUnsupportedKeyType", kt, err)
			}
			got, err := s.GetKey(t.Context(), kept)
			if err != nil {
				t.Fatalf("GetKey(%q): %v", kept, err)
			}
			if !samePublicKey(got.Public(), orig.Public()) {
				t.Error("a failed GenerateKey changed the existing key")
			}
		})
	}
}

// testConcurrent is meant to run under -race: writers replace a shared key
// and their own keys while readers load the shared one.
func testConcurrent(t *testing.T, s keystore.Store) {
	const (
		writers = 4
		readers = 4
		rounds  = 5
		shared  = "shared"
	)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			own := fmt.Sprintf("writer-%d", w)
			for range rounds {
				for _, id := range []string{own, shared} {
					signer, err := s.GenerateKey(t.Context(), id, keystore.ECDSAP256)
					if err != nil {
						t.Errorf("GenerateKey(%q): %v", id, err)
						return
					}
					if err := signVerify(signer, signer.Public(), crypto.SHA256); err != nil {
						t.Errorf("key %q: %v", id, err)
						return
					}
				}
				// Nobody else writes own, so it must read back unchanged.
				got, err := s.GetKey(t.Context(), own)
				if err != nil {
					t.Errorf("GetKey(%q): %v", own, err)
					return
				}
				if err := signVerify(got, got.Public(), crypto.SHA256); err != nil {
					t.Errorf("key %q: %v", own, err)
					return
				}
			}
		})
	}
	for range readers {
		wg.Go(func() {
			for range rounds * 2 {
				got, err := s.GetKey(t.Context(), shared)
				if errors.Is(err, keystore.ErrNotFound) {
					continue // no writer has got there yet
				}
				if err != nil {
					t.Errorf("GetKey(%q): %v", shared, err)
					return
				}
				if err := signVerify(got, got.Public(), crypto.SHA256); err != nil {
					t.Errorf("key %q: %v", shared, err)
					return
				}
			}
		})
	}
	wg.Wait()

	for _, id := range []string{shared, "writer-0"} {
		got, err := s.GetKey(t.Context(), id)
		if err != nil {
			t.Fatalf("GetKey(%q) after concurrent writes: %v", id, err)
		}
		checkPublicKey(t, got.Public(), keystore.ECDSAP256)
	}
}

func testDelete(t *testing.T, s keystore.Store) {
	d := s.(keystore.Deleter)
	const id, other = "doomed", "survivor"
	old, err := s.GenerateKey(t.Context(), id, keystore.ECDSAP256)
	if err != nil {
		t.Fatalf("GenerateKey(%q): %v", id, err)
	}
	survivor, err := s.GenerateKey(t.Context(), other, keystore.ECDSAP256)
	if err != nil {
		t.Fatalf("GenerateKey(%q): %v", other, err)
	}
	if _, err := s.GetKey(t.Context(), id); err != nil {
		t.Fatalf("GetKey(%q): %v", id, err)
	}

	if err := d.DeleteKey(t.Context(), id); err != nil {
		t.Fatalf("DeleteKey(%q): %v", id, err)
	}
	if _, err := s.GetKey(t.Context(), id); !errors.Is(err, keystore.ErrNotFound) {
		t.Fatalf("GetKey(%q) after DeleteKey = %v, want keystore.ErrNotFound", id, err)
	}
	// Deleting twice may be idempotent or report the key missing, but must
	// not report anything else.
	if err := d.DeleteKey(t.Context(), id); err != nil && !errors.Is(err, keystore.ErrNotFound) {
		t.Fatalf("second DeleteKey(%q) = %v, want nil or keystore.ErrNotFound", id, err)
	}

	got, err := s.GetKey(t.Context(), other)
	if err != nil {
		t.Fatalf("GetKey(%q) after deleting %q: %v", other, id, err)
	}
	if !samePublicKey(got.Public(), survivor.Public()) {
		t.Fatalf("deleting %q changed %q", id, other)
	}

	fresh, err := s.GenerateKey(t.Context(), id, keystore.ECDSAP256)
	if err != nil {
		t.Fatalf("GenerateKey(%q) after DeleteKey: %v", id, err)
	}
	if samePublicKey(fresh.Public(), old.Public()) {
		t.Fatal("GenerateKey after DeleteKey returned the deleted key")
	}
	got, err = s.GetKey(t.Context(), id)
	if err != nil {
		t.Fatalf("GetKey(%q) after regenerating: %v", id, err)
	}
	if !samePublicKey(got.Public(), fresh.Public()) {
		t.Fatal("GetKey after regenerating a deleted key did not return the new key")
	}
}

func checkPublicKey(t *testing.T, pub crypto.PublicKey, kt keystore.KeyType) {
	t.Helper()
	spec := specFor(t, kt)
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		if spec.curve == nil {
			t.Fatalf("%s key has an ECDSA public key", kt)
		}
		if pub.Curve != spec.curve {
			t.Fatalf("%s key is on curve %s, want %s", kt, pub.Curve.Params().Name, spec.curve.Params().Name)
		}
	case *rsa.PublicKey:
		if spec.bits == 0 {
			t.Fatalf("%s key has an RSA public key", kt)
		}
		if got := pub.N.BitLen(); got != spec.bits {
			t.Fatalf("%s key has %d bits, want %d", kt, got, spec.bits)
		}
	default:
		t.Fatalf("%s key has public key of type %T", kt, pub)
	}
}

func checkSignatures(t *testing.T, signer crypto.Signer, pub crypto.PublicKey, kt keystore.KeyType) {
	t.Helper()
	spec := specFor(t, kt)
	if err := signVerify(signer, pub, spec.hash); err != nil {
		t.Fatalf("%s: %v", kt, err)
	}
	if rsaPub, ok := pub.(*rsa.PublicKey); ok {
		// The CA may be configured for PSS, which needs the signer to honour
		// crypto.SignerOpts beyond the hash.
		digest := hashOf(spec.hash, "keystoretest pss")
		opts := &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: spec.hash}
		sig, err := signer.Sign(rand.Reader, digest, opts)
		if err != nil {
			t.Fatalf("%s: PSS Sign: %v", kt, err)
		}
		if err := rsa.VerifyPSS(rsaPub, spec.hash, digest, sig, opts); err != nil {
			t.Fatalf("%s: PSS signature does not verify: %v", kt, err)
		}
	}
}

// signVerify signs a digest the way x509 does (ASN.1 ECDSA, PKCS #1 v1.5 RSA)
// and verifies it under pub.
func signVerify(signer crypto.Signer, pub crypto.PublicKey, h crypto.Hash) error {
	digest := hashOf(h, "keystoretest")
	sig, err := signer.Sign(rand.Reader, digest, h)
	if err != nil {
		return fmt.Errorf("signing: %w", err)
	}
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest, sig) {
			return errors.New("ECDSA signature does not verify")
		}
	case *rsa.PublicKey:
		if err := rsa.VerifyPKCS1v15(pub, h, digest, sig); err != nil {
			return fmt.Errorf("PKCS #1 v1.5 signature does not verify: %w", err)
		}
	default:
		return fmt.Errorf("unexpected public key type %T", pub)
	}
	return nil
}

// checkCertificate self-signs a CA certificate with signer, which is how the
// CA will actually use it.
func checkCertificate(t *testing.T, signer crypto.Signer, kt keystore.KeyType) {
	t.Helper()
	algs := []x509.SignatureAlgorithm{x509.UnknownSignatureAlgorithm} // x509's default
	if specFor(t, kt).bits != 0 {
		algs = append(algs, x509.SHA256WithRSAPSS)
	}
	now := time.Now()
	for i, alg := range algs {
		tmpl := &x509.Certificate{
			SerialNumber:          big.NewInt(int64(i + 1)),
			Subject:               pkix.Name{CommonName: "keystoretest " + string(kt)},
			NotBefore:             now.Add(-time.Minute),
			NotAfter:              now.Add(time.Hour),
			IsCA:                  true,
			BasicConstraintsValid: true,
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
			SignatureAlgorithm:    alg,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, signer.Public(), signer)
		if err != nil {
			t.Fatalf("%s: CreateCertificate (%v): %v", kt, alg, err)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatalf("%s: ParseCertificate: %v", kt, err)
		}
		if !samePublicKey(cert.PublicKey, signer.Public()) {
			t.Fatalf("%s: certificate holds a different public key", kt)
		}
		if err := cert.CheckSignatureFrom(cert); err != nil {
			t.Fatalf("%s: self-signed certificate (%v) does not verify: %v", kt, cert.SignatureAlgorithm, err)
		}
	}
}

func hashOf(h crypto.Hash, msg string) []byte {
	hh := h.New()
	hh.Write([]byte(msg))
	return hh.Sum(nil)
}

func samePublicKey(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}
