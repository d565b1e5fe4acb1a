package vault_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/internal/vaulttest"
	"github.com/meshca/meshca/keystore/vault"
)

// Token lifetimes below are real, and short, so that expiry happens during
// the test. Nothing asserts how long anything took: the tests wait for
// Vault-observable events (logins, renewals, tokens gone), bounded by
// waitLimit only so that a broken renewal fails instead of hanging.
const (
	shortTTL  = "4s"
	waitLimit = 2 * time.Minute
)

// TestTokenRenewal: a periodic token lives only as long as it is renewed.
// Run keeps renewing it, and it still signs after several periods.
func TestTokenRenewal(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	token := v.KeysToken(t, api.TokenCreateRequest{Period: shortTTL})
	reg := prometheus.NewRegistry()
	cfg := config(v, vault.TokenAuth{Token: token})
	cfg.Metrics = vault.NewMetrics(reg)
	s := newStore(t, cfg)
	signer := generate(t, s, "ca")
	runStore(t, s)

	// The first renewal happens at once, the rest at about two thirds of
	// the period, so three renewals outlast the unrenewed token.
	waitFor(t, waitLimit, "three token renewals", func() bool {
		if err := signVerify(signer, "renewing"); err != nil {
			t.Fatalf("signing while the token is renewed: %v", err)
		}
		return testenv.GatheredValue(t, reg, "meshca_vault_token_renewals_total", nil) >= 3
	})
	if err := signVerify(signer, "renewed"); err != nil {
		t.Fatalf("signing after renewals: %v", err)
	}
}

// TestTokenMaxTTL: a token that cannot outlive its maximum TTL cannot be
// replaced either, so Run reports it rather than let signing stop quietly.
func TestTokenMaxTTL(t *testing.T) {
	t.Parallel()
	v := vaulttest.Start(t)
	token := v.KeysToken(t, api.TokenCreateRequest{TTL: shortTTL, ExplicitMaxTTL: shortTTL})
	s := newStore(t, config(v, vault.TokenAuth{Token: token}))
	done := make(chan error, 1)
	go func() { done <- s.Run(t.Context()) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "maximum TTL") {
			t.Fatalf("Run = %v, want an error about the token's maximum TTL", err)
		}
		t.Logf("Run: %v", err)
	case <-time.After(waitLimit):
		t.Fatal("Run still running after the token's maximum TTL")
	}

	bad := newStore(t, config(v, vault.TokenAuth{Token: "hvs.not-a-token"}))
	if err := bad.Run(t.Context()); !errors.Is(err, vault.ErrLoginRefused) {
		t.Fatalf("Run with a bad token = %v, want ErrLoginRefused", err)
	}
}

// TestAppRole logs in with AppRole, and keeps signing across the expiry of
// tokens that cannot be renewed past a few seconds: Run logs in again
// before each expires.
func TestAppRole(t *testing.T) {
	t.Parallel()
	v, s, reg := shortAppRoleStore(t)
	if err := s.Check(t.Context()); err != nil {
		t.Fatalf("Check: %v", err)
	}
	signer := generate(t, s, "ca")
	first := approleAccessors(t, v)
	if len(first) != 1 {
		t.Fatalf("%d AppRole tokens after the first login, want 1", len(first))
	}
	runStore(t, s)

	logins := func() float64 {
		return testenv.GatheredValue(t, reg, "meshca_vault_logins_total", map[string]string{"method": "approle", "result": "ok"})
	}
	// Until the first token is gone and two more logins have happened,
	// every signature must still succeed.
	waitFor(t, waitLimit, "the first token to expire and two re-logins", func() bool {
		if err := signVerify(signer, "across expiry"); err != nil {
			t.Fatalf("signing across token expiry: %v", err)
		}
		return logins() >= 3 && !tokenExists(t, v, first[0])
	})
	if err := signVerify(signer, "after expiry"); err != nil {
		t.Fatalf("signing after the first token expired: %v", err)
	}
	if n := testenv.GatheredValue(t, reg, "meshca_vault_logins_total", map[string]string{"result": "error"}); n != 0 {
		t.Errorf("%v failed logins, want 0", n)
	}
}

// TestKubernetes logs in with a real service account token, which Vault
// checks with a TokenReview against a real kube-apiserver.
func TestKubernetes(t *testing.T) {
	t.Parallel()
	k := testenv.StartKube(t)
	v := vaulttest.Start(t)
	v.WritePolicy(t, "meshca-keys", vaulttest.KeysPolicy)
	v.EnableKubernetesAuth(t, k, "kubernetes")
	const ns = "meshca-system"
	k.CreateServiceAccount(t, ns, "meshca")
	k.CreateServiceAccount(t, ns, "intruder")
	v.KubernetesRole(t, "kubernetes", "meshca", map[string]any{
		"bound_service_account_names":      []string{"meshca"},
		"bound_service_account_namespaces": []string{ns},
		"token_policies":                   []string{"meshca-keys"},
		"token_no_default_policy":          true,
		"token_ttl":                        shortTTL,
		"token_max_ttl":                    shortTTL,
	})
	dir := t.TempDir()
	tokenFile := writeFile(t, dir, "token", k.Token(t, ns, "meshca", nil, time.Hour, nil))

	t.Run("refused", func(t *testing.T) {
		intruder := writeFile(t, dir, "intruder", k.Token(t, ns, "intruder", nil, time.Hour, nil))
		for name, auth := range map[string]vault.KubernetesAuth{
			"unknown role":       {Role: "nobody", TokenFile: tokenFile},
			"unbound account":    {Role: "meshca", TokenFile: intruder},
			"not a token at all": {Role: "meshca", TokenFile: writeFile(t, dir, "garbage", "not-a-jwt")},
		} {
			err := newStore(t, config(v, auth)).Check(t.Context())
			if !errors.Is(err, vault.ErrLoginRefused) {
				t.Errorf("%s: Check = %v, want ErrLoginRefused", name, err)
			}
		}
	})

	// The token file is read at every login: a re-login that finds a bad
	// token fails and is retried on the store's clock until a good token
	// is back.
	t.Run("relogin", func(t *testing.T) {
		clock := clockwork.NewFakeClock()
		reg := prometheus.NewRegistry()
		cfg := config(v, vault.KubernetesAuth{Role: "meshca", TokenFile: tokenFile})
		cfg.Clock = clock
		cfg.Metrics = vault.NewMetrics(reg)
		s := newStore(t, cfg)
		if err := s.Check(t.Context()); err != nil {
			t.Fatalf("Check: %v", err)
		}
		signer := generate(t, s, "ca")
		if err := signVerify(signer, "kubernetes"); err != nil {
			t.Fatal(err)
		}
		writeFile(t, dir, "token", "not-a-jwt")
		runStore(t, s)

		// When the first token nears expiry, Run logs in again, reads the
		// bad token, fails and waits on the clock.
		ctx, cancel := context.WithTimeout(t.Context(), waitLimit)
		defer cancel()
		if err := clock.BlockUntilContext(ctx, 1); err != nil {
			t.Fatalf("Run did not wait to retry a failed login: %v", err)
		}
		if n := testenv.GatheredValue(t, reg, "meshca_vault_logins_total", map[string]string{"method": "kubernetes", "result": "error"}); n != 1 {
			t.Fatalf("%v failed logins, want 1", n)
		}
		writeFile(t, dir, "token", k.Token(t, ns, "meshca", nil, time.Hour, nil))
		clock.Advance(time.Second)
		waitFor(t, waitLimit, "a login with the new token", func() bool {
			// Check's login, then the retried one.
			return testenv.GatheredValue(t, reg, "meshca_vault_logins_total", map[string]string{"method": "kubernetes", "result": "ok"}) >= 2
		})
		if err := signVerify(signer, "after re-login"); err != nil {
			t.Fatalf("signing after re-login: %v", err)
		}
	})
}

// shortAppRoleStore starts a Vault and returns a store that logs in to it
// with AppRole, as a role whose tokens hold vaulttest.KeysPolicy and expire after
// shortTTL, unrenewable, and the registry of the store's metrics.
func shortAppRoleStore(t *testing.T) (*vaulttest.Vault, *vault.Store, *prometheus.Registry) {
	t.Helper()
	v := vaulttest.Start(t)
	v.WritePolicy(t, "meshca-keys", vaulttest.KeysPolicy)
	v.EnableAuth(t, "approle", "approle")
	roleID, secretID := v.AppRole(t, "approle", "meshca", map[string]any{
		"token_policies":          []string{"meshca-keys"},
		"token_no_default_policy": true,
		"token_ttl":               shortTTL,
		"token_max_ttl":           shortTTL,
	})
	reg := prometheus.NewRegistry()
	cfg := config(v, vault.AppRoleAuth{RoleID: roleID, SecretIDFile: writeFile(t, t.TempDir(), "secret-id", secretID)})
	cfg.Metrics = vault.NewMetrics(reg)
	return v, newStore(t, cfg), reg
}

// approleAccessors lists the accessors of live tokens issued by AppRole.
func approleAccessors(t *testing.T, v *vaulttest.Vault) []string {
	t.Helper()
	list, err := v.Client().Logical().ListWithContext(t.Context(), "auth/token/accessors")
	if err != nil || list == nil {
		t.Fatalf("listing token accessors: %v", err)
	}
	var out []string
	for _, a := range list.Data["keys"].([]any) {
		info, err := v.Client().Auth().Token().LookupAccessorWithContext(t.Context(), fmt.Sprint(a))
		if err != nil {
			continue // expired between the list and the lookup
		}
		if info.Data["path"] == "auth/approle/login" {
			out = append(out, fmt.Sprint(a))
		}
	}
	return out
}

// tokenExists reports whether the token behind accessor is still valid.
func tokenExists(t *testing.T, v *vaulttest.Vault, accessor string) bool {
	t.Helper()
	_, err := v.Client().Auth().Token().LookupAccessorWithContext(t.Context(), accessor)
	var re *api.ResponseError
	if errors.As(err, &re) && re.StatusCode == 400 {
		return false // "invalid accessor": expired and revoked
	}
	if err != nil {
		t.Fatalf("looking up accessor: %v", err)
	}
	return true
}

// TestSignLogsInAgainAfterExpiry: with no Run to replace it, a token that
// expired is replaced by a login when a signature meets it, and the
// signature succeeds.
func TestSignLogsInAgainAfterExpiry(t *testing.T) {
	t.Parallel()
	v, s, reg := shortAppRoleStore(t)
	signer := generate(t, s, "ca")
	first := approleAccessors(t, v)
	if len(first) != 1 {
		t.Fatalf("%d AppRole tokens after the first login, want 1", len(first))
	}
	waitFor(t, waitLimit, "the first token to expire", func() bool { return !tokenExists(t, v, first[0]) })
	if err := signVerify(signer, "after expiry"); err != nil {
		t.Fatalf("signing with an expired token and no Run: %v", err)
	}
	if n := testenv.GatheredValue(t, reg, "meshca_vault_logins_total", map[string]string{"method": "approle", "result": "ok"}); n != 2 {
		t.Errorf("%v logins, want 2: the first and one after expiry", n)
	}
}
