package kube_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/kube"
	"github.com/meshca/meshca/internal/testenv"
)

// These tests run against a real kube-apiserver: tokens minted with the
// TokenRequest API, reviewed with the TokenReview API.

func newRealAuth(t *testing.T, env *testenv.Kube) *kube.Authenticator {
	t.Helper()
	a, err := kube.New(kube.Config{TrustDomain: td, Reviewer: env.Clientset().AuthenticationV1().TokenReviews()})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestAgainstAPIServer(t *testing.T) {
	env := testenv.StartKube(t)
	env.CreateServiceAccount(t, "shop", "cart")
	pod := env.CreatePod(t, "shop", "cart-0", "cart")
	a := newRealAuth(t, env)
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
		before := env.MetricValue(t, "apiserver_request_total", map[string]string{"resource": "tokenreviews"})
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
		if got := env.MetricValue(t, "apiserver_request_total", map[string]string{"resource": "tokenreviews"}) - before; got != 1 {
			t.Fatalf("the API server saw %v TokenReviews, want exactly 1", got)
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
