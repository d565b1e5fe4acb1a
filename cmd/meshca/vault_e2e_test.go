package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/internal/vaulttest"
	"github.com/meshca/meshca/keystore/vault"
)

// vaultArgs are the flags of a keystore in v, logging in with a token that
// holds only the documented policy.
func vaultArgs(t *testing.T, v *vaulttest.Vault) []string {
	t.Helper()
	token := v.KeysToken(t, api.TokenCreateRequest{TTL: "1h"})
	return []string{"--keystore", "vault", "--vault-addr", v.Addr(), "--vault-ca-file", v.CAFile(),
		"--vault-auth", "token", "--vault-token-file", writeFile(t, "vault-token", []byte(token))}
}

// vaultServerArgs are the flags of a dev-token server whose CA keys live in
// v.
func vaultServerArgs(t *testing.T, v *vaulttest.Vault, dir string, extra ...string) []string {
	t.Helper()
	args := append([]string{"--data-dir", dir}, vaultArgs(t, v)...)
	args = append(args, "--authenticator", "dev", "--dev-token-key", filepath.Join(dir, "dev-token-key.pem"),
		"--bundle-out", filepath.Join(dir, "bundle.pem"))
	return append(args, extra...)
}

// vaultSigns is how many signatures the server asked Vault for.
func vaultSigns(t *testing.T, monitor string) float64 {
	t.Helper()
	return testenv.ScrapedValue(t, "http://"+monitor+"/metrics", "meshca_vault_sign_requests_total", nil)
}

// issueLeaf runs the documented client flow against a server started with
// vaultServerArgs and returns the SVID's chain and the trust bundle.
func issueLeaf(t *testing.T, dir, grpcAddr, sa string) ([]*x509.Certificate, []*x509.Certificate) {
	t.Helper()
	tokenFile := writeFile(t, sa+".token", []byte(meshcaCmd(t, "dev", "token", "--data-dir", dir, "-n", "shop", "-s", sa)))
	out := filepath.Join(t.TempDir(), sa)
	meshcaCmd(t, "cert", "--addr", grpcAddr, "--ca-bundle", filepath.Join(dir, "bundle.pem"), "--token-file", tokenFile, "--out", out)
	svid, bundle := loadSVID(t, out)
	return svid.Certificates, bundle.X509Authorities()
}

// TestServerWithVaultKeystore: the root key is a non-exportable Transit key
// in a real Vault, this replica's intermediate is signed there, and leaves
// are signed locally without a single call to Vault.
func TestServerWithVaultKeystore(t *testing.T) {
	v := vaulttest.Start(t)
	dir := t.TempDir()
	srv := startServerProc(t, vaultServerArgs(t, v, dir)...)

	chain, roots := issueLeaf(t, dir, srv.grpc, "cart")
	if _, _, err := x509svid.Verify(chain, bundleOf(roots)); err != nil {
		t.Fatalf("leaf does not verify against the bundle: %v", err)
	}
	if len(roots) != 1 || len(chain) != 2 {
		t.Fatalf("got %d roots and a chain of %d, want 1 and leaf+intermediate", len(roots), len(chain))
	}

	// The root's public key is the Transit key's: the root was self-signed
	// in Vault, and its private key is not exportable.
	j, err := ca.LoadJournal(filepath.Join(dir, "ca-journal.json"))
	if err != nil {
		t.Fatal(err)
	}
	if j.Current.IntermediateCertPEM != "" {
		t.Fatal("the per-replica intermediate was written to the journal")
	}
	rootKey := "meshca-" + j.Current.RootKeyID + ".ecdsa-p256"
	key := v.Read(t, "transit/keys/"+rootKey)
	if key == nil {
		t.Fatalf("no Transit key for root %s", j.Current.RootKeyID)
	}
	if exp, _ := key.Data["exportable"].(bool); exp {
		t.Fatal("the root's Transit key is exportable")
	}
	if pub, ok := roots[0].PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(v.TransitPublicKey(t, rootKey)) {
		t.Fatalf("root public key %T differs from the Transit key's", roots[0].PublicKey)
	}
	if _, err := v.Client().Logical().Read("transit/export/signing-key/" + rootKey); err == nil {
		t.Fatal("Vault exported the root key")
	}

	// Leaf issuance never calls Vault.
	before := vaultSigns(t, srv.monitor)
	for _, sa := range []string{"a", "b", "c", "d", "e"} {
		issueLeaf(t, dir, srv.grpc, sa)
	}
	if after := vaultSigns(t, srv.monitor); after != before {
		t.Fatalf("issuing 5 leaves made %v Transit signatures, want 0", after-before)
	}

	// A root rotation's new root is made in Vault as well.
	sock := filepath.Join(dir, "admin", "admin.sock")
	var st rotation.Status
	if err := admin.NewUnixClient(sock).Do(context.Background(), http.MethodPost, "/v1/roots/prepare", admin.StepRequest{}, &st); err != nil {
		t.Fatal(err)
	}
	j, err = ca.LoadJournal(filepath.Join(dir, "ca-journal.json"))
	if err != nil || j.Next == nil {
		t.Fatalf("journal after prepare: next %v, err %v", j.Next, err)
	}
	if v.Read(t, "transit/keys/meshca-"+j.Next.RootKeyID+".ecdsa-p256") == nil {
		t.Fatal("the prepared root's key is not in Vault")
	}
}

// TestServerVaultStartupErrors: a Vault meshca cannot use stops start-up
// with an error that names the cause.
func TestServerVaultStartupErrors(t *testing.T) {
	v := vaulttest.Start(t)
	dir := t.TempDir()
	base := func(extra ...string) []string { return vaultServerArgs(t, v, dir, extra...) }
	closed := freeAddr(t)

	for _, c := range []struct {
		name string
		args []string
		want error
		hint string
	}{
		{"unreachable", base("--vault-addr", "https://"+closed, "--vault-check-timeout", "5s"), vault.ErrUnreachable, "--vault-addr"},
		// The root token: a policy scoped to one mount is denied the other
		// before Vault could say that it is missing.
		{"mount missing", base("--vault-mount", "no-such-transit",
			"--vault-token-file", writeFile(t, "root-token", []byte(v.RootToken()))), vault.ErrMountMissing, "vault secrets enable"},
		{"policy too narrow", base("--vault-mount", "no-such-transit"), vault.ErrPermissionDenied, "docs/vault.md"},
		{"login refused", base("--vault-token-file", writeFile(t, "bad-token", []byte("hvs.not-a-token"))), vault.ErrLoginRefused, "refused meshca's credentials"},
		{"approle refused", base("--vault-auth", "approle", "--vault-approle-role-id", "nope",
			"--vault-approle-secret-id-file", writeFile(t, "secret-id", []byte("nope"))), vault.ErrLoginRefused, "--vault-auth"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := serverError(t, c.args...)
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.hint) {
				t.Fatalf("err = %v\nwant %v with a hint naming %q", err, c.want, c.hint)
			}
		})
	}
	// Sealing is for good on a dev server, so it comes last.
	sealedArgs := base()
	v.Seal(t)
	t.Run("sealed", func(t *testing.T) {
		err := serverError(t, sealedArgs...)
		if !errors.Is(err, vault.ErrSealed) || !strings.Contains(err.Error(), "unseal") {
			t.Fatalf("err = %v, want ErrSealed with a hint to unseal", err)
		}
	})
	if _, err := os.Stat(filepath.Join(dir, "ca-journal.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused start-up wrote a journal (%v)", err)
	}
}

func bundleOf(roots []*x509.Certificate) *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("cluster.local"), roots)
}

// TestServerVaultOutage: with Vault stopped, leaves keep coming from the
// replica's intermediate, renewal fails visibly (/readyz degraded, a
// metric) and is retried, a root operation fails as unavailable; once Vault
// is back, renewal and root operations recover without a restart.
func TestServerVaultOutage(t *testing.T) {
	v := vaulttest.StartWith(t, vaulttest.Options{Persistent: true})
	dir := t.TempDir()
	// A 70s intermediate, backdated 1 minute, is due for renewal 5s after
	// it is signed and expires a minute later: the outage outlasts one
	// renewal and ends well before expiry.
	srv := startServerProc(t, vaultServerArgs(t, v, dir, "--intermediate-ttl", "70s", "--leaf-ttl", "5s",
		"--max-leaf-ttl", "5s", "--issuer-coverage", "1", "--ca-maintain-interval", "500ms")...)
	readyz := "http://" + srv.monitor + "/readyz"
	metrics := "http://" + srv.monitor + "/metrics"
	sock := filepath.Join(dir, "admin", "admin.sock")
	before, _ := issueLeaf(t, dir, srv.grpc, "before")

	v.Stop(t)
	testenv.Eventually(t, "/readyz reports the failing renewal", func() error {
		body := httpGet(t, readyz, http.StatusOK)
		if !strings.Contains(body, "[!] ca degraded") || !strings.Contains(body, "Vault unreachable") {
			return fmt.Errorf("/readyz:\n%s", body)
		}
		return nil
	})
	if got := testenv.ScrapedValue(t, metrics, "meshca_ca_maintenance_failing", nil); got != 1 {
		t.Fatalf("meshca_ca_maintenance_failing = %v during the outage, want 1", got)
	}
	during, roots := issueLeaf(t, dir, srv.grpc, "during")
	if !during[1].Equal(before[1]) {
		t.Fatal("the intermediate changed while Vault was down")
	}
	if _, _, err := x509svid.Verify(during, bundleOf(roots)); err != nil {
		t.Fatalf("leaf issued during the outage does not verify: %v", err)
	}
	err := admin.NewUnixClient(sock).Do(context.Background(), http.MethodPost, "/v1/roots/prepare", admin.StepRequest{}, nil)
	var apiErr *admin.APIError
	if !errors.As(err, &apiErr) || apiErr.HTTPStatus != http.StatusServiceUnavailable || !strings.Contains(err.Error(), "unavailable") {
		t.Fatalf("root prepare with Vault down: %v, want 503 naming the unavailable keystore", err)
	}
	t.Logf("root prepare with Vault down: %v", err)

	v.Restart(t)
	testenv.Eventually(t, "renewal recovers once Vault is back", func() error {
		body := httpGet(t, readyz, http.StatusOK)
		if strings.Contains(body, "degraded") {
			return fmt.Errorf("/readyz:\n%s", body)
		}
		return nil
	})
	if got := testenv.ScrapedValue(t, metrics, "meshca_ca_maintenance_failing", nil); got != 0 {
		t.Fatalf("meshca_ca_maintenance_failing = %v after recovery, want 0", got)
	}
	after, roots := issueLeaf(t, dir, srv.grpc, "after")
	if after[1].Equal(before[1]) {
		t.Fatal("no new intermediate after Vault came back")
	}
	if _, _, err := x509svid.Verify(after, bundleOf(roots)); err != nil {
		t.Fatalf("leaf after recovery does not verify: %v", err)
	}
	if err := admin.NewUnixClient(sock).Do(context.Background(), http.MethodPost, "/v1/roots/prepare", admin.StepRequest{}, nil); err != nil {
		t.Fatalf("root prepare after Vault came back: %v", err)
	}
}

// TestRootRotationWithVault is TestRootRotationUnderTraffic with the root
// keys in Vault: the new root is made and self-signed there, and the
// retired root's key is deleted from it.
func TestRootRotationWithVault(t *testing.T) {
	v := vaulttest.Start(t)
	m := startMeshWith(t, vaultArgs(t, v), "web", "cart")
	j, err := ca.LoadJournal(filepath.Join(m.dataDir, devJournalFile))
	if err != nil {
		t.Fatal(err)
	}
	oldKey := "transit/keys/meshca-" + j.Current.RootKeyID + ".ecdsa-p256"
	if v.Read(t, oldKey) == nil {
		t.Fatalf("root key %s is not in Vault", j.Current.RootKeyID)
	}
	rotateUnderTraffic(t, m)
	j, err = ca.LoadJournal(filepath.Join(m.dataDir, devJournalFile))
	if err != nil {
		t.Fatal(err)
	}
	if v.Read(t, "transit/keys/meshca-"+j.Current.RootKeyID+".ecdsa-p256") == nil {
		t.Fatalf("the new root key %s is not in Vault", j.Current.RootKeyID)
	}
	if v.Read(t, oldKey) != nil {
		t.Fatal("the retired root's key is still in Vault")
	}
}
