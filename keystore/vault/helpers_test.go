package vault_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshca/meshca/internal/vaulttest"
	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/keystore/vault"
)

// signOnlyPolicy lacks everything but signing and reading.
const signOnlyPolicy = `
path "transit/keys/meshca-*" {
  capabilities = ["read"]
}
path "transit/sign/meshca-*" {
  capabilities = ["update"]
}
path "sys/capabilities-self" {
  capabilities = ["update"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
`

// config is a store configuration for v with the given auth and a key
// prefix under the policies' meshca-*.
func config(v *vaulttest.Vault, auth vault.Auth) vault.Config {
	return vault.Config{
		Address:   v.Addr(),
		TLS:       vault.TLSConfig{CAFile: v.CAFile()},
		KeyPrefix: "meshca-",
		Auth:      auth,
	}
}

func newStore(t *testing.T, cfg vault.Config) *vault.Store {
	t.Helper()
	s, err := vault.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s
}

// runStore runs s.Run until the test ends and then checks that it
// returned nil.
func runStore(t *testing.T, s *vault.Store) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

// signVerify signs a digest with s and checks the ECDSA signature under s's
// public key.
func signVerify(s crypto.Signer, msg string) error {
	digest := sha256.Sum256([]byte(msg))
	sig, err := s.Sign(nil, digest[:], crypto.SHA256)
	if err != nil {
		return err
	}
	pub, ok := s.Public().(*ecdsa.PublicKey)
	if !ok {
		return fmt.Errorf("public key is %T, want ECDSA", s.Public())
	}
	if !ecdsa.VerifyASN1(pub, digest[:], sig) {
		return errors.New("signature does not verify")
	}
	return nil
}

func generate(t *testing.T, s keystore.Store, id string) crypto.Signer {
	t.Helper()
	signer, err := s.GenerateKey(t.Context(), id, keystore.ECDSAP256)
	if err != nil {
		t.Fatalf("GenerateKey(%q): %v", id, err)
	}
	return signer
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// waitFor polls cond every 20 ms until it holds, failing the test after
// limit. It bounds how long a test may hang; it asserts nothing about how
// long anything took.
func waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %v", what, limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
