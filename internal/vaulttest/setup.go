package vaulttest

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/meshca/meshca/internal/testenv"
)

// Write writes data to path as root and returns Vault's response.
func (v *Vault) Write(t testing.TB, path string, data map[string]any) *api.Secret {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	s, err := v.client.Logical().WriteWithContext(ctx, path, data)
	if err != nil {
		t.Fatalf("vaulttest: writing %s: %v", path, err)
	}
	return s
}

// Read reads path as root; nil means nothing is there.
func (v *Vault) Read(t testing.TB, path string) *api.Secret {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	s, err := v.client.Logical().ReadWithContext(ctx, path)
	if err != nil {
		t.Fatalf("vaulttest: reading %s: %v", path, err)
	}
	return s
}

// EnableSecretsEngine mounts a secrets engine of type typ, such as
// "transit" or "kv", at path.
func (v *Vault) EnableSecretsEngine(t testing.TB, path, typ string) {
	t.Helper()
	v.Write(t, "sys/mounts/"+path, map[string]any{"type": typ})
}

// EnableAuth enables an auth method of type typ, such as "approle", at
// path.
func (v *Vault) EnableAuth(t testing.TB, path, typ string) {
	t.Helper()
	v.Write(t, "sys/auth/"+path, map[string]any{"type": typ})
}

// WritePolicy creates or replaces the ACL policy name.
func (v *Vault) WritePolicy(t testing.TB, name, hcl string) {
	t.Helper()
	v.Write(t, "sys/policies/acl/"+name, map[string]any{"policy": hcl})
}

// CreateToken creates a token as root and returns it. req sets policies,
// TTL, period, renewability and so on.
func (v *Vault) CreateToken(t testing.TB, req *api.TokenCreateRequest) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	s, err := v.client.Auth().Token().CreateWithContext(ctx, req)
	if err != nil {
		t.Fatalf("vaulttest: creating a token: %v", err)
	}
	return s.Auth.ClientToken
}

// KeysPolicy is the policy docs/vault.md gives meshca, for the default
// mount "transit" and the key prefix "meshca-", with what it adds for
// deleting keys: delete on the keys and update on their config.
const KeysPolicy = `
path "transit/keys/meshca-*" {
  capabilities = ["read", "update", "delete"]
}
path "transit/keys/meshca-*/rotate" {
  capabilities = ["update"]
}
path "transit/keys/meshca-*/config" {
  capabilities = ["update"]
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
path "auth/token/renew-self" {
  capabilities = ["update"]
}
`

// KeysToken writes KeysPolicy as the policy meshca-keys and creates a token
// as req says that holds that policy and no other, not even Vault's
// default policy: what it can do, the documented policy allows.
func (v *Vault) KeysToken(t testing.TB, req api.TokenCreateRequest) string {
	t.Helper()
	v.WritePolicy(t, "meshca-keys", KeysPolicy)
	req.Policies = []string{"meshca-keys"}
	req.NoDefaultPolicy = true
	return v.CreateToken(t, &req)
}

// TransitPublicKey returns the public key of the latest version of the
// Transit key name, in the mount Start enabled. Transit gives it in PEM
// for ECDSA and RSA keys.
func (v *Vault) TransitPublicKey(t testing.TB, name string) crypto.PublicKey {
	t.Helper()
	path := v.transitMount + "/keys/" + name
	s := v.Read(t, path)
	if s == nil {
		t.Fatalf("vaulttest: no Transit key at %s", path)
	}
	keys, _ := s.Data["keys"].(map[string]any)
	latest, _ := keys[fmt.Sprint(s.Data["latest_version"])].(map[string]any)
	pemData, _ := latest["public_key"].(string)
	block, _ := pem.Decode([]byte(pemData))
	if block == nil {
		t.Fatalf("vaulttest: Transit key %s: no PEM public key in %v", path, s.Data)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		t.Fatalf("vaulttest: Transit key %s: %v", path, err)
	}
	return pub
}

// AppRole creates role at the AppRole auth method mounted at mount, with
// params such as token_policies and token_ttl, and returns its role ID and
// a new secret ID. The mount must be enabled (EnableAuth).
func (v *Vault) AppRole(t testing.TB, mount, role string, params map[string]any) (roleID, secretID string) {
	t.Helper()
	v.Write(t, "auth/"+mount+"/role/"+role, params)
	r := v.Read(t, "auth/"+mount+"/role/"+role+"/role-id")
	if r == nil {
		t.Fatalf("vaulttest: no role ID for AppRole %s", role)
	}
	s := v.Write(t, "auth/"+mount+"/role/"+role+"/secret-id", nil)
	roleID, _ = r.Data["role_id"].(string)
	secretID, _ = s.Data["secret_id"].(string)
	if roleID == "" || secretID == "" {
		t.Fatalf("vaulttest: AppRole %s: empty role ID or secret ID", role)
	}
	return roleID, secretID
}

// EnableKubernetesAuth enables the Kubernetes auth method at mount and
// points it at k: Vault checks service account tokens with TokenReviews
// made as its own service account, vault-system/vault-reviewer-<mount>,
// which holds system:auth-delegator as a real deployment's would.
func (v *Vault) EnableKubernetesAuth(t testing.TB, k *testenv.Kube, mount string) {
	t.Helper()
	const ns = "vault-system"
	sa := "vault-reviewer-" + strings.NewReplacer("/", "-", "_", "-", ".", "-").Replace(strings.ToLower(mount))
	k.CreateServiceAccount(t, ns, sa)
	k.Grant(t, ns, sa, "system:auth-delegator")
	ca, err := os.ReadFile(k.CAFile())
	if err != nil {
		t.Fatalf("vaulttest: %v", err)
	}
	v.EnableAuth(t, mount, "kubernetes")
	v.Write(t, "auth/"+mount+"/config", map[string]any{
		"kubernetes_host":    k.Host(),
		"kubernetes_ca_cert": string(ca),
		"token_reviewer_jwt": k.Token(t, ns, sa, nil, time.Hour, nil),
	})
}

// KubernetesRole creates role at the Kubernetes auth method mounted at
// mount, with params such as bound_service_account_names,
// bound_service_account_namespaces, token_policies and token_ttl.
func (v *Vault) KubernetesRole(t testing.TB, mount, role string, params map[string]any) {
	t.Helper()
	v.Write(t, "auth/"+mount+"/role/"+role, params)
}
