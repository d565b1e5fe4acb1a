package multicluster_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/multicluster"
	"github.com/meshca/meshca/internal/testenv"
)

// fakeMember stands in for a cluster at the Member seam; real clusters are
// proven in TestTwoClusters.
type fakeMember struct {
	id      string
	denied  atomic.Pointer[error]
	checks  atomic.Int32
	running atomic.Bool
	stopped chan struct{}
}

func newFake(id string) *fakeMember { return &fakeMember{id: id, stopped: make(chan struct{})} }

func (f *fakeMember) Authenticate(_ context.Context, cred identity.Credential) (identity.Caller, error) {
	return identity.Caller{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b"), ClusterID: cred.ClusterID}, nil
}

func (f *fakeMember) CheckAccess(context.Context) error {
	f.checks.Add(1)
	if err := f.denied.Load(); err != nil {
		return *err
	}
	return nil
}

func (f *fakeMember) Run(ctx context.Context) error {
	f.running.Store(true)
	<-ctx.Done()
	close(f.stopped)
	return nil
}

func TestRouter(t *testing.T) {
	clock := clockwork.NewFakeClock()
	var mu sync.Mutex
	built := map[string][]*fakeMember{}
	denyNext := errors.New("lack permission to create tokenreviews")
	r, err := multicluster.New(multicluster.Config{
		LocalID: "west", Clock: clock, RetryInterval: time.Minute,
		Build: func(id string, kc []byte) (multicluster.Member, error) {
			if string(kc) == "garbage" {
				return nil, errors.New("not a kubeconfig")
			}
			m := newFake(id)
			if string(kc) == "weak" {
				m.denied.Store(&denyNext)
			}
			mu.Lock()
			built[id] = append(built[id], m)
			mu.Unlock()
			return m, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	local := newFake("west")
	if err := r.Add(ctx, "west", local); err != nil {
		t.Fatal(err)
	}
	denied := newFake("bad")
	denied.denied.Store(&denyNext)
	if err := r.Add(ctx, "bad", denied); err == nil || !strings.Contains(err.Error(), "lack permission") {
		t.Fatalf("Add of a cluster without permissions: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	auth := func(cluster string) (identity.Caller, error) {
		return r.Authenticate(ctx, identity.Credential{Token: "t", ClusterID: cluster})
	}

	if c, err := auth(""); err != nil || c.ClusterID != "west" {
		t.Fatalf("no cluster ID: %+v %v, want the local cluster", c, err)
	}
	if _, err := auth("bad"); identity.ReasonOf(err) != identity.ReasonUnknownCluster {
		t.Fatalf("a cluster whose Add failed: %v, want unknown", err)
	}

	r.SetSource("secret/a", map[string][]byte{"east": []byte("kc1"), "south": []byte("weak"), "north": []byte("garbage"), "west": []byte("kc-shadow")})
	testenv.Eventually(t, "east usable", func() error { _, err := auth("east"); return err })
	if _, err := auth("south"); identity.ReasonOf(err) != identity.ReasonUnavailable {
		t.Fatalf("south: %v, want unavailable", err)
	}
	testenv.Eventually(t, "south's check failed", func() error {
		_, err := auth("south")
		if identity.ReasonOf(err) != identity.ReasonUnavailable || !strings.Contains(err.Error(), "lack permission") {
			return fmt.Errorf("err = %v, want unavailable naming the permission", err)
		}
		return nil
	})
	// south is retried on the clock and recovers when granted.
	south := built["south"][0]
	south.denied.Store(nil)
	testenv.Eventually(t, "south retried", func() error { clock.Advance(time.Minute); _, err := auth("south"); return err })

	// The same kubeconfig again changes nothing; a new one replaces the
	// member; a missing key removes it.
	r.SetSource("secret/a", map[string][]byte{"east": []byte("kc1"), "south": []byte("weak2")})
	if len(built["east"]) != 1 {
		t.Fatalf("an unchanged kubeconfig rebuilt east")
	}
	<-south.stopped
	r.SetSource("secret/a", map[string][]byte{"south": []byte("kc3")})
	<-built["east"][0].stopped
	if _, err := auth("east"); identity.ReasonOf(err) != identity.ReasonUnknownCluster || !strings.Contains(err.Error(), `unknown cluster "east" (this server knows south, west)`) {
		t.Fatalf("east after removal: %v", err)
	}
	// Another source cannot take over south.
	r.SetSource("secret/b", map[string][]byte{"south": []byte("other")})
	if n := len(built["south"]); n != 3 {
		t.Fatalf("south built %d times, want 3 (no takeover by another Secret)", n)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !local.running.Load() {
		t.Error("the local cluster never ran")
	}
	<-local.stopped
}

func TestCheckKubeconfig(t *testing.T) {
	plain := `apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://10.0.0.1"}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`
	for _, tc := range []struct{ name, kc, want string }{
		{"token", plain, ""},
		{"exec plugin", execKubeconfig, "credential plugin"},
		{"token file", strings.Replace(plain, "token: abc", "tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token", 1), "reads files"},
		{"not YAML", "{{{", "not a kubeconfig"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := multicluster.CheckKubeconfig([]byte(tc.kc))
			if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}
