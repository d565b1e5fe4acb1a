package kube_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/kube"
	"github.com/meshca/meshca/internal/testenv"
)

// These tests run against a real kube-apiserver: tokens minted with the
// TokenRequest API, reviewed with the TokenReview API.

// newCluster returns a running cluster authenticator (binding checks on)
// acting as the admin.
func newCluster(t *testing.T, env *testenv.Kube, mod ...func(*kube.ClusterConfig)) *kube.Cluster {
	t.Helper()
	cfg := kube.ClusterConfig{ID: "Kubernetes", REST: env.Config(), TrustDomain: td}
	for _, m := range mod {
		m(&cfg)
	}
	c, err := kube.NewCluster(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	defer wcancel()
	if err := c.WaitForSync(wctx); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestAgainstAPIServer(t *testing.T) {
	env := testenv.StartKube(t)
	env.CreateServiceAccount(t, "shop", "cart")
	pod := env.CreatePod(t, "shop", "cart-0", "cart")
	a := newCluster(t, env)
	ctx := context.Background()

	t.Run("pod-bound token", func(t *testing.T) {
		tok := env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, pod)
		c, err := a.Authenticate(ctx, identity.Credential{Token: tok})
		if err != nil {
			t.Fatal(err)
		}
		if c.ID.String() != "spiffe://cluster.local/ns/shop/sa/cart" || c.PodName != "cart-0" || c.PodUID != string(pod.UID) {
			t.Fatalf("caller = %+v", c)
		}
		if c.Expiry.Before(time.Now().Add(50*time.Minute)) || c.Expiry.After(time.Now().Add(61*time.Minute)) {
			t.Errorf("expiry %v is not the token's (about an hour from now)", c.Expiry)
		}
	})
	t.Run("wrong audience", func(t *testing.T) {
		tok := env.Token(t, "shop", "cart", []string{"vault"}, time.Hour, nil)
		_, err := a.Authenticate(ctx, identity.Credential{Token: tok})
		if identity.ReasonOf(err) != identity.ReasonWrongAudience || !strings.Contains(err.Error(), "invalid for the target audiences") {
			t.Fatalf("err = %v, want wrong audience", err)
		}
	})
	t.Run("forged token", func(t *testing.T) {
		key, _ := rsa.GenerateKey(rand.Reader, 2048)
		signer, _ := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key}, nil)
		tok, _ := jwt.Signed(signer).Claims(jwt.Claims{
			Issuer: "https://kubernetes.default.svc.cluster.local", Subject: "system:serviceaccount:shop:cart",
			Audience: jwt.Audience{"meshca"}, Expiry: jwt.NewNumericDate(time.Now().Add(time.Hour)),
		}).Serialize()
		_, err := a.Authenticate(ctx, identity.Credential{Token: tok})
		if identity.ReasonOf(err) != identity.ReasonInvalid {
			t.Fatalf("err = %v, want invalid", err)
		}
	})
	t.Run("one review for 1,000 concurrent requests", func(t *testing.T) {
		tok := env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, nil)
		before := tokenReviews(t, env)
		var wg sync.WaitGroup
		errs := make(chan error, 1000)
		for i := 0; i < 1000; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := a.Authenticate(ctx, identity.Credential{Token: tok})
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if got := tokenReviews(t, env) - before; got != 1 {
			t.Fatalf("the API server saw %v TokenReviews, want exactly 1", got)
		}
	})
	t.Run("expired token", func(t *testing.T) {
		sa := getSA(t, env, "shop", "cart")
		// Past the API server's one-minute leeway.
		tok := env.SignToken(t, sa, []string{"meshca"}, nil, time.Now().Add(-time.Hour), time.Now().Add(-5*time.Minute))
		_, err := a.Authenticate(ctx, identity.Credential{Token: tok})
		if identity.ReasonOf(err) != identity.ReasonExpired {
			t.Fatalf("err = %v, want expired", err)
		}
		// The same key and claims, unexpired: only the expiry was wrong.
		tok = env.SignToken(t, sa, []string{"meshca"}, nil, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
		if _, err := a.Authenticate(ctx, identity.Credential{Token: tok}); err != nil {
			t.Fatalf("control token refused: %v", err)
		}
	})
	t.Run("token of a user, not a service account", func(t *testing.T) {
		// Static tokens carry no audience, so the API server accepts one
		// only for its own audience.
		own := newCluster(t, env, func(c *kube.ClusterConfig) { c.Audiences = []string{"meshca", testenv.Issuer} })
		_, err := own.Authenticate(ctx, identity.Credential{Token: env.AdminToken()})
		if identity.ReasonOf(err) != identity.ReasonNotServiceAccount || !strings.Contains(err.Error(), `"testenv-admin"`) {
			t.Fatalf("err = %v, want not a service account", err)
		}
		if _, err := a.Authenticate(ctx, identity.Credential{Token: env.AdminToken()}); identity.ReasonOf(err) != identity.ReasonInvalid {
			t.Fatalf("with meshca's audience only: err = %v, want invalid", err)
		}
	})
	t.Run("pod-bound tokens required", func(t *testing.T) {
		strict := newCluster(t, env, func(c *kube.ClusterConfig) { c.RequirePodBound = true })
		_, err := strict.Authenticate(ctx, identity.Credential{Token: env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, nil)})
		if identity.ReasonOf(err) != identity.ReasonNotPodBound {
			t.Fatalf("unbound token: err = %v, want not pod-bound", err)
		}
		if _, err := strict.Authenticate(ctx, identity.Credential{Token: env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, pod)}); err != nil {
			t.Fatalf("pod-bound token: %v", err)
		}
	})
	t.Run("deleted pod, then a new pod of the same name", func(t *testing.T) {
		env.CreatePod(t, "shop", "cart-1", "cart")
		old := env.CreatePod(t, "shop", "cart-2", "cart")
		tok := env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, old)
		if _, err := a.Authenticate(ctx, identity.Credential{Token: tok}); err != nil {
			t.Fatal(err)
		}
		reviews := tokenReviews(t, env)
		env.Delete(t, "pod", "shop", "cart-2")
		// The review is cached; the informer revokes it.
		testenv.Eventually(t, "token of a deleted pod", func() error {
			_, err := a.Authenticate(ctx, identity.Credential{Token: tok})
			if identity.ReasonOf(err) != identity.ReasonUnknownPod {
				return fmt.Errorf("err = %v, want unknown pod", err)
			}
			return nil
		})
		if got := tokenReviews(t, env) - reviews; got != 0 {
			t.Errorf("revocation took %v TokenReviews, want 0 (the informer knows)", got)
		}
		// A deleted pod's token presented in a loop costs at most one GET
		// to confirm the informer, not one per request.
		gets := env.MetricValue(t, "apiserver_request_total", map[string]string{"resource": "pods", "verb": "GET"})
		for range 20 {
			if _, err := a.Authenticate(ctx, identity.Credential{Token: tok}); identity.ReasonOf(err) != identity.ReasonUnknownPod {
				t.Fatalf("err = %v, want unknown pod", err)
			}
		}
		if got := env.MetricValue(t, "apiserver_request_total", map[string]string{"resource": "pods", "verb": "GET"}) - gets; got > 1 {
			t.Errorf("20 requests with a deleted pod's token made %v pod GETs, want at most 1", got)
		}
		recreated := env.CreatePod(t, "shop", "cart-2", "cart")
		if recreated.UID == old.UID {
			t.Fatal("the recreated pod kept its UID")
		}
		if _, err := a.Authenticate(ctx, identity.Credential{Token: tok}); identity.ReasonOf(err) != identity.ReasonUnknownPod {
			t.Fatalf("old pod's token after a new pod took its name: err = %v, want unknown pod", err)
		}
		c, err := a.Authenticate(ctx, identity.Credential{Token: env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, recreated)})
		if err != nil || c.PodUID != string(recreated.UID) {
			t.Fatalf("new pod's token: %+v, %v", c, err)
		}
	})
	t.Run("deleted service account, then a new one of the same name", func(t *testing.T) {
		env.CreateServiceAccount(t, "shop", "temp")
		tok := env.Token(t, "shop", "temp", []string{"meshca"}, time.Hour, nil)
		c, err := a.Authenticate(ctx, identity.Credential{Token: tok})
		if err != nil || c.ServiceAccountUID == "" {
			t.Fatalf("caller %+v, err %v; want the service account's UID", c, err)
		}
		env.Delete(t, "serviceaccount", "shop", "temp")
		testenv.Eventually(t, "token of a deleted service account", func() error {
			_, err := a.Authenticate(ctx, identity.Credential{Token: tok})
			if identity.ReasonOf(err) != identity.ReasonUnknownServiceAccount {
				return fmt.Errorf("err = %v, want unknown service account", err)
			}
			return nil
		})
		// The API server's own token cache would still accept the token
		// for a few seconds; the informer has already revoked it.
		env.CreateServiceAccount(t, "shop", "temp")
		if _, err := a.Authenticate(ctx, identity.Credential{Token: tok}); identity.ReasonOf(err) != identity.ReasonUnknownServiceAccount {
			t.Fatalf("the old account's token for the new account of the same name: err = %v, want unknown service account", err)
		}
	})
	t.Run("API server outage", func(t *testing.T) {
		cached := env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, nil)
		fresh := env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, nil)
		if _, err := a.Authenticate(ctx, identity.Credential{Token: cached}); err != nil {
			t.Fatal(err)
		}
		env.Stop(t)
		if _, err := a.Authenticate(ctx, identity.Credential{Token: cached}); err != nil {
			t.Fatalf("cached identity refused while the API server is down: %v", err)
		}
		if _, err := a.Authenticate(ctx, identity.Credential{Token: fresh}); identity.ReasonOf(err) != identity.ReasonUnavailable {
			t.Fatalf("new token while the API server is down: %v, want unavailable", err)
		}
		env.Start(t)
		if _, err := a.Authenticate(ctx, identity.Credential{Token: fresh}); err != nil {
			t.Fatalf("no recovery after the API server returned: %v", err)
		}
	})
}

// tokenReviews is how many TokenReviews the API server has answered.
func tokenReviews(t *testing.T, env *testenv.Kube) float64 {
	t.Helper()
	return env.MetricValue(t, "apiserver_request_total", map[string]string{"resource": "tokenreviews"})
}

func getSA(t *testing.T, env *testenv.Kube, ns, name string) *corev1.ServiceAccount {
	t.Helper()
	sa, err := env.Clientset().CoreV1().ServiceAccounts(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return sa
}

func TestStartupAccessCheck(t *testing.T) {
	env := testenv.StartKube(t)
	env.CreateServiceAccount(t, "meshca-system", "meshca")
	ctx := context.Background()
	check := func() error {
		c, err := kube.NewCluster(kube.ClusterConfig{ID: "east", REST: env.ConfigFor(t, "meshca-system", "meshca"), TrustDomain: td})
		if err != nil {
			t.Fatal(err)
		}
		return c.CheckAccess(ctx)
	}
	err := check()
	if err == nil || !strings.Contains(err.Error(), `cluster "east": meshca's credentials lack permission to create tokenreviews.authentication.k8s.io (cluster-wide), get pods (cluster-wide),`) {
		t.Fatalf("no permissions: err = %v", err)
	}
	env.Grant(t, "meshca-system", "meshca", "system:auth-delegator")
	err = check()
	if err == nil || !strings.Contains(err.Error(), "lack permission to get pods (cluster-wide), list pods (cluster-wide), watch pods (cluster-wide), get serviceaccounts (cluster-wide), list serviceaccounts (cluster-wide), watch serviceaccounts (cluster-wide);") {
		t.Fatalf("with system:auth-delegator: err = %v, want only the informers' permissions missing", err)
	}
	_, err = env.Clientset().RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "meshca-binding"},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods", "serviceaccounts"}, Verbs: []string{"get", "list", "watch"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	env.Grant(t, "meshca-system", "meshca", "meshca-binding")
	if err := check(); err != nil {
		t.Fatalf("with both roles: %v", err)
	}
}
