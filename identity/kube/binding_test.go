package kube_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	authnv1 "k8s.io/api/authentication/v1"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/kube"
)

// fakeObjects stands in for the informers at the Objects seam; the real
// Index is proven against a real API server.
type fakeObjects struct {
	mu    sync.Mutex
	pods  map[string]string // ns/name → uid
	sas   map[string]string
	nodes map[string]string
	err   error
	calls int
}

func (f *fakeObjects) Pod(_ context.Context, ns, name, uid string) (string, error) {
	return f.lookup(f.pods, "pod", ns, name, uid)
}

func (f *fakeObjects) ServiceAccount(_ context.Context, ns, name, uid string) error {
	_, err := f.lookup(f.sas, "serviceaccount", ns, name, uid)
	return err
}

func (f *fakeObjects) lookup(m map[string]string, kind, ns, name, uid string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.err != nil {
		return "", f.err
	}
	if m[ns+"/"+name] != uid {
		return "", fmt.Errorf("%w: %s %s/%s", kube.ErrGone, kind, ns, name)
	}
	return f.nodes[ns+"/"+name], nil
}

func (f *fakeObjects) set(fn func(*fakeObjects)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func podBound(uid, saUID string) func(authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
	return func(spec authnv1.TokenReviewSpec) (authnv1.TokenReviewStatus, error) {
		st, err := serviceAccount("shop", "cart", map[string]authnv1.ExtraValue{
			"authentication.kubernetes.io/pod-name": {"cart-0"},
			"authentication.kubernetes.io/pod-uid":  {uid},
		})(spec)
		st.User.UID = saUID
		return st, err
	}
}

func TestBindingRevokesCachedIdentities(t *testing.T) {
	r := &fakeReviewer{}
	r.set(podBound("pod-1", "sa-1"))
	objs := &fakeObjects{
		pods:  map[string]string{"shop/cart-0": "pod-1"},
		sas:   map[string]string{"shop/cart": "sa-1"},
		nodes: map[string]string{"shop/cart-0": "node-a"},
	}
	a := newAuth(t, r, clockwork.NewFakeClockAt(start), func(c *kube.Config) { c.Objects = objs })
	tok := fakeJWT(start.Add(time.Hour))
	auth := func() (identity.Caller, error) {
		return a.Authenticate(context.Background(), identity.Credential{Token: tok})
	}
	c, err := auth()
	if err != nil {
		t.Fatal(err)
	}
	if c.NodeName != "node-a" || c.ServiceAccountUID != "sa-1" || c.PodUID != "pod-1" {
		t.Fatalf("caller = %+v, want the node filled in from the pod", c)
	}
	if _, err := auth(); err != nil || r.calls.Load() != 1 || objs.calls != 4 {
		t.Fatalf("second request: err %v, %d reviews, %d lookups; want cached, with both objects checked again", err, r.calls.Load(), objs.calls)
	}

	objs.set(func(f *fakeObjects) { f.pods["shop/cart-0"] = "pod-2" }) // recreated under the same name
	if _, err := auth(); identity.ReasonOf(err) != identity.ReasonUnknownPod {
		t.Fatalf("pod replaced: err = %v, want unknown pod", err)
	}
	// The refusal dropped the cache entry: the next request reviews again.
	objs.set(func(f *fakeObjects) { f.pods["shop/cart-0"] = "pod-1" })
	if _, err := auth(); err != nil || r.calls.Load() != 2 {
		t.Fatalf("after the pod came back: err %v, %d reviews, want a fresh review", err, r.calls.Load())
	}

	objs.set(func(f *fakeObjects) { delete(f.sas, "shop/cart") })
	if _, err := auth(); identity.ReasonOf(err) != identity.ReasonUnknownServiceAccount {
		t.Fatalf("account deleted: err = %v, want unknown service account", err)
	}

	objs.set(func(f *fakeObjects) {
		f.sas["shop/cart"] = "sa-1"
		f.err = errors.New("informer not synced; GET: connection refused")
	})
	if _, err := auth(); identity.ReasonOf(err) != identity.ReasonUnavailable || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("lookup failed: err = %v, want unavailable (fail closed, not unknown)", err)
	}
}

func TestRequirePodBound(t *testing.T) {
	r := &fakeReviewer{}
	r.set(serviceAccount("shop", "cart", nil))
	a := newAuth(t, r, clockwork.NewFakeClockAt(start), func(c *kube.Config) { c.RequirePodBound = true })
	_, err := a.Authenticate(context.Background(), identity.Credential{Token: fakeJWT(start.Add(time.Hour))})
	if identity.ReasonOf(err) != identity.ReasonNotPodBound || !strings.Contains(err.Error(), "shop/cart") {
		t.Fatalf("err = %v, want not pod-bound", err)
	}
	r.set(podBound("pod-1", "sa-1"))
	if _, err := a.Authenticate(context.Background(), identity.Credential{Token: fakeJWT(start.Add(time.Hour))}); err != nil {
		t.Fatalf("pod-bound token: %v", err)
	}
}

func TestNoCacheReviewsEveryRequest(t *testing.T) {
	r := &fakeReviewer{}
	r.set(serviceAccount("shop", "cart", nil))
	a := newAuth(t, r, clockwork.NewFakeClockAt(start), func(c *kube.Config) { c.NoCache = true })
	tok := fakeJWT(start.Add(time.Hour))
	for range 5 {
		if _, err := a.Authenticate(context.Background(), identity.Credential{Token: tok}); err != nil {
			t.Fatal(err)
		}
	}
	if got := r.calls.Load(); got != 5 {
		t.Fatalf("%d reviews for 5 requests with the cache off, want 5", got)
	}
}

func TestPermissionNames(t *testing.T) {
	for _, tc := range []struct {
		p    kube.Permission
		want string
	}{
		{kube.Permission{Verb: "create", Group: "authentication.k8s.io", Resource: "tokenreviews"}, "create tokenreviews.authentication.k8s.io (cluster-wide)"},
		{kube.Permission{Verb: "watch", Resource: "secrets", Namespace: "meshca-system"}, "watch secrets in namespace meshca-system"},
	} {
		if got := tc.p.String(); got != tc.want {
			t.Errorf("%#v = %q, want %q", tc.p, got, tc.want)
		}
	}
	if got := len(kube.RequiredPermissions(false)); got != 1 {
		t.Errorf("without binding checks: %d permissions, want 1", got)
	}
	if got := len(kube.RequiredPermissions(true)); got != 7 {
		t.Errorf("with binding checks: %d permissions, want 7", got)
	}
}
