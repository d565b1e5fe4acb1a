package main

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/kubestate"
)

// followingElector is a leader.Elector whose leadership the test sets;
// asked tells the test each time publishBundle looks at it.
type followingElector struct {
	mu      sync.Mutex
	leading bool
	changed chan struct{}
	asked   chan bool
}

func (e *followingElector) Run(ctx context.Context) error { <-ctx.Done(); return nil }
func (e *followingElector) Identity() string              { return "me" }
func (e *followingElector) Leader() string                { return "" }
func (e *followingElector) Changed() <-chan struct{} {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.changed
}

func (e *followingElector) IsLeader() bool {
	e.mu.Lock()
	l := e.leading
	e.mu.Unlock()
	e.asked <- l
	return l
}

func (e *followingElector) lead() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.leading = true
	close(e.changed)
	e.changed = make(chan struct{})
}

// TestOnlyTheLeaderPublishesTheBundle: a follower never writes the bundle
// ConfigMap (it may not have read the leader's latest step yet); once it
// leads, it publishes the CA's roots.
func TestOnlyTheLeaderPublishesTheBundle(t *testing.T) {
	a := catest.NewAuthority(t, nil)
	client := fake.NewClientset()
	pub, err := kubestate.NewBundleConfigMap(kubestate.BundleConfig{Client: client, Namespace: "meshca-system"})
	if err != nil {
		t.Fatal(err)
	}
	el := &followingElector{changed: make(chan struct{}), asked: make(chan bool)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- publishBundle(ctx, a, el, pub, slog.New(slog.DiscardHandler)) }()
	t.Cleanup(func() {
		cancel()
		for {
			select {
			case <-el.asked:
			case err := <-done:
				if err != nil {
					t.Error(err)
				}
				return
			}
		}
	})

	waitAsked := func(want bool) {
		t.Helper()
		select {
		case got := <-el.asked:
			if got != want {
				t.Fatalf("IsLeader answered %v, want %v", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("publishBundle never asked whether it leads")
		}
	}
	waitAsked(false)
	if n := len(client.Actions()); n != 0 {
		t.Fatalf("a follower made %d API calls: %v", n, client.Actions())
	}
	el.lead()
	waitAsked(true)
	want := string(ca.EncodeCerts(a.Issuer().Roots...))
	deadline := time.Now().Add(10 * time.Second)
	for {
		cm, err := client.CoreV1().ConfigMaps("meshca-system").Get(ctx, kubestate.DefaultBundleName, metav1.GetOptions{})
		if err == nil && cm.Data[kubestate.DefaultBundleKey] == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the leader did not publish the bundle: %v %v", cm, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
