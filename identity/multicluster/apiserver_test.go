package multicluster_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/kube"
	"github.com/meshca/meshca/identity/multicluster"
	"github.com/meshca/meshca/internal/testenv"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// TestTwoClusters runs two real API servers: west, where meshca runs, and
// east, a remote cluster added through a labelled Secret in west.
func TestTwoClusters(t *testing.T) {
	west := testenv.StartKube(t)
	east := testenv.StartKube(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for _, env := range []*testenv.Kube{west, east} {
		env.CreateServiceAccount(t, "shop", "cart")
	}
	// In east, meshca's account holds exactly the permissions it needs; in
	// east's "weak" account, none.
	east.CreateServiceAccount(t, "meshca-system", "meshca-remote")
	east.CreateServiceAccount(t, "meshca-system", "weak")
	east.Grant(t, "meshca-system", "meshca-remote", "system:auth-delegator")
	if _, err := east.Clientset().RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "meshca-binding"},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods", "serviceaccounts"}, Verbs: []string{"get", "list", "watch"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	east.Grant(t, "meshca-system", "meshca-remote", "meshca-binding")

	metrics := kube.NewMetrics(nil)
	build := func(id string, kc []byte) (multicluster.Member, error) {
		rc, err := clientcmd.RESTConfigFromKubeConfig(kc)
		if err != nil {
			return nil, err
		}
		return kube.NewCluster(kube.ClusterConfig{ID: id, REST: rc, TrustDomain: td, Metrics: metrics})
	}
	r, err := multicluster.New(multicluster.Config{LocalID: "west", Build: build, RetryInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	local, err := kube.NewCluster(kube.ClusterConfig{ID: "west", REST: west.Config(), TrustDomain: td, Metrics: metrics})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Add(ctx, "west", local); err != nil {
		t.Fatal(err)
	}
	w, err := multicluster.NewSecretWatcher(multicluster.SecretsConfig{Client: west.Clientset(), Namespace: "meshca-system", Sink: r})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 2)
	go func() { done <- r.Run(ctx) }()
	go func() { done <- w.Run(ctx) }()
	defer func() {
		cancel()
		for range 2 {
			if err := <-done; err != nil {
				t.Error(err)
			}
		}
	}()

	westTok := west.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, nil)
	eastTok := east.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, nil)
	auth := func(tok, cluster string) (identity.Caller, error) {
		return r.Authenticate(ctx, identity.Credential{Token: tok, ClusterID: cluster})
	}

	if c, err := auth(westTok, ""); err != nil || c.ClusterID != "west" {
		t.Fatalf("local token without a cluster ID: %+v, %v", c, err)
	}
	if _, err := auth(eastTok, "east"); identity.ReasonOf(err) != identity.ReasonUnknownCluster ||
		!strings.Contains(err.Error(), `unknown cluster "east" (this server knows west)`) {
		t.Fatalf("before the Secret: err = %v, want unknown cluster", err)
	}

	west.CreateNamespace(t, "meshca-system")
	secret := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "remotes", Namespace: "meshca-system", Labels: map[string]string{"meshca/multi-cluster": "true"}},
		Data: map[string][]byte{
			"east":  east.KubeconfigFor(t, "meshca-system", "meshca-remote"),
			"south": east.KubeconfigFor(t, "meshca-system", "weak"),
			"north": []byte(execKubeconfig),
		},
	}
	secrets := west.Clientset().CoreV1().Secrets("meshca-system")
	if _, err := secrets.Create(ctx, secret, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "east usable after its Secret appeared", func() error {
		c, err := auth(eastTok, "east")
		if err == nil && (c.ClusterID != "east" || c.ID.String() != "spiffe://cluster.local/ns/shop/sa/cart") {
			t.Fatalf("caller = %+v", c)
		}
		return err
	})

	t.Run("token presented with the wrong cluster ID", func(t *testing.T) {
		if _, err := auth(eastTok, "west"); identity.ReasonOf(err) != identity.ReasonInvalid {
			t.Fatalf("east's token as west: err = %v, want invalid", err)
		}
		if _, err := auth(westTok, "east"); identity.ReasonOf(err) != identity.ReasonInvalid {
			t.Fatalf("west's token as east: err = %v, want invalid", err)
		}
	})
	t.Run("each cluster has its own cache", func(t *testing.T) {
		tok := east.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, nil)
		before := east.MetricValue(t, "apiserver_request_total", map[string]string{"resource": "tokenreviews"})
		westBefore := west.MetricValue(t, "apiserver_request_total", map[string]string{"resource": "tokenreviews"})
		for range 50 {
			if _, err := auth(tok, "east"); err != nil {
				t.Fatal(err)
			}
		}
		if got := east.MetricValue(t, "apiserver_request_total", map[string]string{"resource": "tokenreviews"}) - before; got != 1 {
			t.Errorf("east saw %v TokenReviews for 50 requests, want 1", got)
		}
		if got := west.MetricValue(t, "apiserver_request_total", map[string]string{"resource": "tokenreviews"}) - westBefore; got != 0 {
			t.Errorf("west saw %v TokenReviews for east's token, want 0", got)
		}
	})
	t.Run("a cluster meshca lacks permissions in", func(t *testing.T) {
		_, err := auth(eastTok, "south")
		if identity.ReasonOf(err) != identity.ReasonUnavailable || !strings.Contains(err.Error(), "lack permission to create tokenreviews") {
			t.Fatalf("err = %v, want unavailable naming the permission", err)
		}
	})
	t.Run("a kubeconfig that would run a program", func(t *testing.T) {
		if _, ok := r.Clusters()["north"]; ok {
			t.Fatal("a kubeconfig with an exec plugin was accepted")
		}
	})
	t.Run("removing the Secret removes the clusters", func(t *testing.T) {
		if err := secrets.Delete(ctx, "remotes", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		testenv.Eventually(t, "east gone", func() error {
			if _, err := auth(eastTok, "east"); identity.ReasonOf(err) != identity.ReasonUnknownCluster {
				return fmt.Errorf("err = %v, want unknown cluster", err)
			}
			return nil
		})
		if _, err := auth(westTok, ""); err != nil {
			t.Fatalf("the local cluster went with the Secret: %v", err)
		}
	})
}

const execKubeconfig = `apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:1"}
users:
- name: u
  user:
    exec: {apiVersion: client.authentication.k8s.io/v1, command: /bin/sh, args: ["-c", "touch /tmp/pwned"]}
contexts:
- name: c
  context: {cluster: c, user: u}
current-context: c
`
