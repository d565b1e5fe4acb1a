package vault_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"testing"

	"github.com/meshca/meshca/internal/benchtest"
	"github.com/meshca/meshca/internal/vaulttest"
	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/keystore/vault"
)

// The benchmarks price one ECDSA P-256 signature of a SHA-256 digest, as
// the CA makes for each certificate, through crypto.Signer: once by Transit
// in a real development Vault on loopback TLS (a request, Vault's signature
// and the store's own verification of it), once by a local key as the disk
// and memory stores sign. Each has a sequential and a parallel variant; the
// parallel one shows how far concurrent issuance overlaps round trips.
//
//	go test -run x -bench . -benchtime 2s ./keystore/vault/

var benchDigest = sha256.Sum256([]byte("a certificate's to-be-signed bytes"))

func BenchmarkTransitSign(b *testing.B) {
	v := vaulttest.Start(b)
	s, err := vault.New(config(v, vault.TokenAuth{Token: v.RootToken()}))
	if err != nil {
		b.Fatalf("New: %v", err)
	}
	signer, err := s.GenerateKey(b.Context(), "bench", keystore.ECDSAP256)
	if err != nil {
		b.Fatalf("GenerateKey: %v", err)
	}
	benchSign(b, signer)
}

func BenchmarkLocalECDSASign(b *testing.B) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	benchSign(b, key)
}

// benchSign runs the sequential and parallel sub-benchmarks on one signer,
// so that the setup, a Vault start among it, is paid once.
func benchSign(b *testing.B, signer crypto.Signer) {
	// A signer's speed means nothing unless its signatures verify.
	sig, err := signer.Sign(rand.Reader, benchDigest[:], crypto.SHA256)
	if err != nil {
		b.Fatalf("Sign: %v", err)
	}
	pub, ok := signer.Public().(*ecdsa.PublicKey)
	if !ok || !ecdsa.VerifyASN1(pub, benchDigest[:], sig) {
		b.Fatalf("signature does not verify under the %T public key", signer.Public())
	}
	benchtest.SequentialAndParallel(b, func(b *testing.B) {
		if _, err := signer.Sign(rand.Reader, benchDigest[:], crypto.SHA256); err != nil {
			b.Errorf("Sign: %v", err)
		}
	})
}
