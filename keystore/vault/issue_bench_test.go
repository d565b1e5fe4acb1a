package vault_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"path/filepath"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/benchtest"
	"github.com/meshca/meshca/internal/vaulttest"
	"github.com/meshca/meshca/keystore/disk"
	"github.com/meshca/meshca/keystore/vault"
)

// BenchmarkLeafIssuance compares the CA's per-leaf signing path with the
// root key on disk (one shared intermediate, its key on disk too) and in
// Vault (a per-replica intermediate in memory, signed once by Transit), in
// the same run. Leaves are signed by the intermediate either way, so the
// two should match: Vault is only on the path of renewals.
func BenchmarkLeafIssuance(b *testing.B) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id := spiffeid.RequireFromPath(td, "/ns/bench/sa/leaf")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	authority := func(b *testing.B, keys ca.KeyStore, perReplica bool) *ca.Authority {
		src, err := ca.NewSelfManaged(ca.SelfManagedConfig{TrustDomain: td, Keys: keys,
			JournalPath: filepath.Join(b.TempDir(), "journal.json"), PerReplicaIntermediates: perReplica})
		if err != nil {
			b.Fatal(err)
		}
		a, err := ca.New(ca.Config{TrustDomain: td, Source: src})
		if err != nil {
			b.Fatal(err)
		}
		if err := a.Init(context.Background()); err != nil {
			b.Fatal(err)
		}
		return a
	}
	run := func(b *testing.B, a *ca.Authority) {
		ctx := context.Background()
		benchtest.SequentialAndParallel(b, func(b *testing.B) {
			if _, err := a.SignKey(ctx, key.Public(), id, 0); err != nil {
				b.Error(err)
			}
		})
	}

	b.Run("disk", func(b *testing.B) {
		store, err := disk.New(disk.Config{Dir: filepath.Join(b.TempDir(), "keys"), Passphrase: []byte("benchmark passphrase")})
		if err != nil {
			b.Fatal(err)
		}
		run(b, authority(b, store, false))
	})
	b.Run("vault", func(b *testing.B) {
		v := vaulttest.Start(b)
		store, err := vault.New(config(v, vault.TokenAuth{Token: v.RootToken()}))
		if err != nil {
			b.Fatal(err)
		}
		run(b, authority(b, store, true))
	})
}
