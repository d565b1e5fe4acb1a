package kube_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/kube"
)

var (
	td    = spiffeid.RequireTrustDomainFromString("cluster.local")
	start = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
)

// fakeReviewer stands in for the API server at the narrow TokenReview seam;
// the same behaviours are proven against a real API server elsewhere.
type fakeReviewer struct {
	calls  atomic.Int64
	gate   chan struct{} // when set, Create waits for it
	mu     sync.Mutex
	answer func(spec authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error)
	specs  []authnv1.TokenReviewSpec
}

func (f *fakeReviewer) Create(_ context.Context, tr *authnv1.TokenReview, _ metav1.CreateOptions) (*authnv1.TokenReview, error) {
	f.calls.Add(1)
	if f.gate != nil {
		<-f.gate
	}
	f.mu.Lock()
	f.specs = append(f.specs, tr.Spec)
	answer := f.answer
	f.mu.Unlock()
	st, err := answer(tr.Spec)
	if err != nil {
		return nil, err
	}
	return &authnv1.TokenReview{Spec: tr.Spec, Status: st}, nil
}

func (f *fakeReviewer) set(answer func(authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error)) {
	f.mu.Lock()
	f.answer = answer
	f.mu.Unlock()
}

func serviceAccount(ns, sa string, extra map[string]authnv1.ExtraValue) func(authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
	return func(spec authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
		return authnv1.TokenReviewStatus{
			Authenticated: true,
			Audiences:     spec.Audiences,
			User: authnv1.UserInfo{
				Username: "system:serviceaccount:" + ns + ":" + sa,
				Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
				Extra:    extra,
			},
		}, nil
	}
}

// fakeJWT builds a token whose payload carries exp; the signature is not
// checked by meshca (the API server checks it).
func fakeJWT(exp time.Time) string {
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(`{"alg":"RS256"}`)) + "." + enc([]byte(fmt.Sprintf(`{"exp":%d,"n":%d}`, exp.Unix(), time.Now().UnixNano()))) + ".sig"
}

func newAuth(t *testing.T, r *fakeReviewer, clock clockwork.Clock, mod ...func(*kube.Config)) *kube.Authenticator {
	t.Helper()
	cfg := kube.Config{TrustDomain: td, Reviewer: r, Clock: clock}
	for _, m := range mod {
		m(&cfg)
	}
	a, err := kube.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestMapsServiceAccountAndPodBinding(t *testing.T) {
	r := &fakeReviewer{}
	r.set(serviceAccount("shop", "cart", map[string]authnv1.ExtraValue{
		"authentication.kubernetes.io/pod-name":  {"cart-7d9"},
		"authentication.kubernetes.io/pod-uid":   {"uid-1"},
		"authentication.kubernetes.io/node-name": {"node-a"},
	}))
	a := newAuth(t, r, clockwork.NewFakeClockAt(start), func(c *kube.Config) { c.Audiences = []string{"meshca", "istio-ca"}; c.ClusterID = "east" })
	tok := fakeJWT(start.Add(time.Hour))
	c, err := a.Authenticate(context.Background(), identity.Credential{Token: tok, ClusterID: "east"})
	if err != nil {
		t.Fatal(err)
	}
	want := identity.Caller{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart"), Namespace: "shop", ServiceAccount: "cart",
		PodName: "cart-7d9", PodUID: "uid-1", NodeName: "node-a", ClusterID: "east", TokenHash: identity.HashToken(tok), Expiry: start.Add(time.Hour)}
	if c != want {
		t.Fatalf("caller = %+v\nwant     %+v", c, want)
	}
	if got := r.specs[0].Audiences; len(got) != 2 || got[0] != "meshca" || got[1] != "istio-ca" {
		t.Errorf("spec.audiences = %v, want the configured ones", got)
	}
}

func TestRefusals(t *testing.T) {
	tests := []struct {
		name    string
		cred    identity.Credential
		answer  func(authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error)
		reason  identity.Reason
		message string
	}{
		{"no token", identity.Credential{}, nil, identity.ReasonMissing, "no token"},
		{"unknown cluster", identity.Credential{Token: "t", ClusterID: "west"}, nil, identity.ReasonUnknownCluster, `unknown cluster "west"`},
		{"wrong audience", identity.Credential{Token: "t"}, func(authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
			return authnv1.TokenReviewStatus{Error: "[invalid bearer token, token audiences [\"vault\"] is invalid for the target audiences [\"meshca\"]]"}, nil
		}, identity.ReasonWrongAudience, "is invalid for the target audiences"},
		{"expired", identity.Credential{Token: "t"}, func(authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
			return authnv1.TokenReviewStatus{Error: "[invalid bearer token, service account token has expired]"}, nil
		}, identity.ReasonExpired, "has expired"},
		{"forged", identity.Credential{Token: "t"}, func(authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
			return authnv1.TokenReviewStatus{Error: "invalid bearer token, square/go-jose: error in cryptographic primitive"}, nil
		}, identity.ReasonInvalid, "cryptographic primitive"},
		{"audiences ignored by the API server", identity.Credential{Token: "t"}, func(authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
			st, _ := serviceAccount("a", "b", nil)(authnv1.TokenReviewSpec{})
			return st, nil
		}, identity.ReasonWrongAudience, "none of [meshca]"},
		{"a user, not a service account", identity.Credential{Token: "t"}, func(s authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
			return authnv1.TokenReviewStatus{Authenticated: true, Audiences: s.Audiences, User: authnv1.UserInfo{Username: "alice", Groups: []string{"system:masters"}}}, nil
		}, identity.ReasonNotServiceAccount, `"alice"`},
		{"service-account name without the group", identity.Credential{Token: "t"}, func(s authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
			return authnv1.TokenReviewStatus{Authenticated: true, Audiences: s.Audiences, User: authnv1.UserInfo{Username: "system:serviceaccount:a:b"}}, nil
		}, identity.ReasonNotServiceAccount, "not a service account"},
		{"API server down", identity.Credential{Token: "t"}, func(authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
			return authnv1.TokenReviewStatus{}, errors.New("dial tcp 127.0.0.1:6443: connect: connection refused")
		}, identity.ReasonUnavailable, "connection refused"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := &fakeReviewer{}
			r.set(tc.answer)
			a := newAuth(t, r, clockwork.NewFakeClockAt(start))
			_, err := a.Authenticate(context.Background(), tc.cred)
			if identity.ReasonOf(err) != tc.reason || !strings.Contains(err.Error(), tc.message) {
				t.Fatalf("err = %v (reason %q), want %s containing %q", err, identity.ReasonOf(err), tc.reason, tc.message)
			}
			// Failures are never cached: the next attempt asks again.
			calls := r.calls.Load()
			a.Authenticate(context.Background(), tc.cred)
			if tc.answer != nil && r.calls.Load() != calls+1 {
				t.Errorf("a failed review was answered from the cache")
			}
		})
	}
}

func TestConcurrentRequestsShareOneReview(t *testing.T) {
	r := &fakeReviewer{gate: make(chan struct{})}
	r.set(serviceAccount("default", "web", nil))
	a := newAuth(t, r, clockwork.NewFakeClockAt(start))
	tok := fakeJWT(start.Add(time.Hour))
	const n = 1000
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := a.Authenticate(context.Background(), identity.Credential{Token: tok})
			errs <- err
		}()
	}
	// Let the first review finish only once it has started, so all the
	// others have either joined it or will find its cached answer.
	for r.calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	close(r.gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := r.calls.Load(); got != 1 {
		t.Fatalf("%d TokenReviews for one token, want 1", got)
	}
}

func TestCacheLifetimeAndOutage(t *testing.T) {
	clock := clockwork.NewFakeClockAt(start)
	r := &fakeReviewer{}
	r.set(serviceAccount("default", "web", nil))
	a := newAuth(t, r, clock, func(c *kube.Config) { c.CacheTTL = 10 * time.Minute })
	short := fakeJWT(start.Add(2 * time.Minute)) // expires before the ceiling
	long := fakeJWT(start.Add(time.Hour))        // outlives the ceiling
	auth := func(tok string) error {
		_, err := a.Authenticate(context.Background(), identity.Credential{Token: tok})
		return err
	}
	for _, tok := range []string{short, long, short, long} {
		if err := auth(tok); err != nil {
			t.Fatal(err)
		}
	}
	if r.calls.Load() != 2 {
		t.Fatalf("%d reviews for two tokens, want 2", r.calls.Load())
	}

	// The API server goes away: cached identities keep working, new tokens
	// are unavailable, not invalid.
	r.set(func(authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
		return authnv1.TokenReviewStatus{}, errors.New("connection refused")
	})
	if err := auth(long); err != nil {
		t.Fatalf("cached identity refused during an outage: %v", err)
	}
	if err := auth(fakeJWT(start.Add(time.Hour))); identity.ReasonOf(err) != identity.ReasonUnavailable {
		t.Fatalf("new token during an outage: %v, want unavailable", err)
	}

	// Past the short token's expiry its entry is gone; past the ceiling the
	// long one's too.
	clock.Advance(3 * time.Minute)
	if err := auth(short); identity.ReasonOf(err) != identity.ReasonUnavailable {
		t.Fatalf("expired cache entry still used: %v", err)
	}
	if err := auth(long); err != nil {
		t.Fatalf("long token within the ceiling: %v", err)
	}
	clock.Advance(8 * time.Minute)
	if err := auth(long); identity.ReasonOf(err) != identity.ReasonUnavailable {
		t.Fatalf("cache entry outlived the ceiling: %v", err)
	}

	// Recovery is automatic.
	r.set(serviceAccount("default", "web", nil))
	if err := auth(long); err != nil {
		t.Fatal(err)
	}
}

func TestCacheIsBounded(t *testing.T) {
	r := &fakeReviewer{}
	r.set(serviceAccount("default", "web", nil))
	a := newAuth(t, r, clockwork.NewFakeClockAt(start), func(c *kube.Config) { c.CacheSize = 3 })
	toks := []string{fakeJWT(start.Add(time.Hour)), fakeJWT(start.Add(time.Hour)), fakeJWT(start.Add(time.Hour)), fakeJWT(start.Add(time.Hour))}
	for _, tok := range toks {
		a.Authenticate(context.Background(), identity.Credential{Token: tok})
	}
	// toks[0] was evicted by toks[3]; toks[3] is still cached.
	before := r.calls.Load()
	a.Authenticate(context.Background(), identity.Credential{Token: toks[3]})
	if r.calls.Load() != before {
		t.Error("most recent entry was evicted")
	}
	a.Authenticate(context.Background(), identity.Credential{Token: toks[0]})
	if r.calls.Load() != before+1 {
		t.Error("the cache grew past its bound")
	}
}
