package testenv_test

import (
	"context"
	"slices"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/internal/testenv"
)

// TestKube proves the environment is a real apiserver: it mints a pod-bound,
// audience-bound token with TokenRequest and has the apiserver review it the
// way meshca's identity layer will, survives an apiserver restart, and reads
// the apiserver's own metrics.
func TestKube(t *testing.T) {
	start := time.Now()
	k := testenv.StartKube(t)
	t.Logf("StartKube took %v", time.Since(start).Round(time.Millisecond))
	cs := k.Clientset()

	k.CreateServiceAccount(t, "apps", "web")
	pod := k.CreatePod(t, "apps", "web-0", "web")
	token := k.Token(t, "apps", "web", []string{"meshca"}, time.Hour, pod)

	review := func(t *testing.T, audiences ...string) *authenticationv1.TokenReviewStatus {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		tr, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
			Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: audiences},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("TokenReview: %v", err)
		}
		return &tr.Status
	}

	t.Run("right audience", func(t *testing.T) {
		st := review(t, "meshca")
		if !st.Authenticated {
			t.Fatalf("not authenticated: %q", st.Error)
		}
		if want := "system:serviceaccount:apps:web"; st.User.Username != want {
			t.Errorf("username %q, want %q", st.User.Username, want)
		}
		if !slices.Equal(st.Audiences, []string{"meshca"}) {
			t.Errorf("audiences %v, want [meshca]", st.Audiences)
		}
		extra := st.User.Extra
		if got := extra["authentication.kubernetes.io/pod-name"]; !slices.Equal(got, authenticationv1.ExtraValue{"web-0"}) {
			t.Errorf("pod-name extra %v, want [web-0]", got)
		}
		if got := extra["authentication.kubernetes.io/pod-uid"]; !slices.Equal(got, authenticationv1.ExtraValue{string(pod.UID)}) {
			t.Errorf("pod-uid extra %v, want [%s]", got, pod.UID)
		}
	})

	t.Run("wrong audience", func(t *testing.T) {
		st := review(t, "someone-else")
		if st.Authenticated {
			t.Fatalf("authenticated for the wrong audience as %q", st.User.Username)
		}
		if st.Error == "" {
			t.Error("no error reported for the wrong audience")
		}
	})

	t.Run("metrics", func(t *testing.T) {
		n := k.MetricValue(t, "apiserver_request_total", map[string]string{"resource": "tokenreviews"})
		if n < 2 {
			t.Errorf("apiserver_request_total{resource=tokenreviews} = %v, want >= 2", n)
		}
	})

	t.Run("restart", func(t *testing.T) {
		k.Stop(t)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := cs.CoreV1().Namespaces().Get(ctx, "apps", metav1.GetOptions{}); err == nil {
			t.Fatal("apiserver answered while stopped")
		}
		k.Start(t)
		// Same port, CA and signing key: old clients and tokens still work.
		if st := review(t, "meshca"); !st.Authenticated {
			t.Fatalf("token not authenticated after restart: %q", st.Error)
		}
	})
	t.Logf("total %v", time.Since(start).Round(time.Millisecond))
}
