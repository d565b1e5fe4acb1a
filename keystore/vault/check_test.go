package vault_test

import (
	"errors"
	"net"
	"testing"

	"github.com/hashicorp/vault/api"

	"github.com/meshca/meshca/internal/vaulttest"
	"github.com/meshca/meshca/keystore/vault"
)

// TestCheck provokes each failure Check names, against a real Vault, and
// matches it with errors.Is.
func TestCheck(t *testing.T) {
	v := vaulttest.Start(t)
	dir := t.TempDir()
	keys := v.KeysToken(t, api.TokenCreateRequest{})
	v.WritePolicy(t, "sign-only", signOnlyPolicy)
	signOnly := v.CreateToken(t, &api.TokenCreateRequest{Policies: []string{"sign-only"}, NoDefaultPolicy: true})
	v.WritePolicy(t, "keys-only", `path "transit/*" { capabilities = ["create", "read", "update"] }`)
	keysOnly := v.CreateToken(t, &api.TokenCreateRequest{Policies: []string{"keys-only"}, NoDefaultPolicy: true})
	v.EnableAuth(t, "approle", "approle")
	roleID, secretID := v.AppRole(t, "approle", "meshca", map[string]any{"token_policies": []string{"meshca-keys"}})
	good := writeFile(t, dir, "secret-id", secretID)
	wrong := writeFile(t, dir, "wrong-secret-id", "00000000-0000-0000-0000-000000000000")

	// A port that was free a moment ago: nothing listens there.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "https://" + l.Addr().String()
	l.Close()

	for _, tt := range []struct {
		name string
		cfg  func(*vault.Config)
		want error // nil: Check passes
	}{
		{"root token", func(c *vault.Config) { c.Auth = vault.TokenAuth{Token: v.RootToken()} }, nil},
		{"documented policy", func(c *vault.Config) {}, nil},
		{"approle", func(c *vault.Config) { c.Auth = vault.AppRoleAuth{RoleID: roleID, SecretIDFile: good} }, nil},
		{"closed port", func(c *vault.Config) { c.Address = closed }, vault.ErrUnreachable},
		{"bad token", func(c *vault.Config) { c.Auth = vault.TokenAuth{Token: "hvs.not-a-token"} }, vault.ErrLoginRefused},
		{"bad approle secret ID", func(c *vault.Config) { c.Auth = vault.AppRoleAuth{RoleID: roleID, SecretIDFile: wrong} }, vault.ErrLoginRefused},
		{"bad approle role ID", func(c *vault.Config) { c.Auth = vault.AppRoleAuth{RoleID: "nobody", SecretIDFile: good} }, vault.ErrLoginRefused},
		{"approle not enabled there", func(c *vault.Config) {
			c.Auth = vault.AppRoleAuth{Mount: "elsewhere", RoleID: roleID, SecretIDFile: good}
		}, vault.ErrLoginRefused},
		{"policy without create", func(c *vault.Config) { c.Auth = vault.TokenAuth{Token: signOnly} }, vault.ErrPermissionDenied},
		{"policy without lookup-self", func(c *vault.Config) { c.Auth = vault.TokenAuth{Token: keysOnly} }, vault.ErrPermissionDenied},
		{"missing mount", func(c *vault.Config) {
			c.Auth = vault.TokenAuth{Token: v.RootToken()}
			c.Mount = "nowhere"
		}, vault.ErrMountMissing},
		{"kv mount", func(c *vault.Config) {
			c.Auth = vault.TokenAuth{Token: v.RootToken()}
			c.Mount = "secret" // the development server's kv-v2
		}, vault.ErrMountMissing},
		{"path inside the transit mount", func(c *vault.Config) {
			c.Auth = vault.TokenAuth{Token: v.RootToken()}
			c.Mount = "transit/keys"
		}, vault.ErrMountMissing},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := config(v, vault.TokenAuth{Token: keys})
			tt.cfg(&cfg)
			err := newStore(t, cfg).Check(t.Context())
			if tt.want == nil {
				if err != nil {
					t.Fatalf("Check: %v", err)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("Check = %v, want an error matching %v", err, tt.want)
			}
			for _, other := range []error{vault.ErrUnreachable, vault.ErrSealed, vault.ErrLoginRefused, vault.ErrPermissionDenied, vault.ErrMountMissing} {
				if other != tt.want && errors.Is(err, other) {
					t.Errorf("Check = %v, which also matches %v", err, other)
				}
			}
			t.Logf("Check: %v", err)
		})
	}

	t.Run("sealed", func(t *testing.T) {
		sealed := vaulttest.Start(t)
		sealed.Seal(t)
		err := newStore(t, config(sealed, vault.TokenAuth{Token: sealed.RootToken()})).Check(t.Context())
		if !errors.Is(err, vault.ErrSealed) {
			t.Fatalf("Check = %v, want ErrSealed", err)
		}
		t.Logf("Check: %v", err)
	})
}
