package vaulttest

import (
	"context"
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
