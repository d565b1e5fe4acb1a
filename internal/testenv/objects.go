package testenv

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// requestTimeout bounds each helper's API call, so a wedged apiserver fails
// the test instead of hanging it until go test's global timeout.
const requestTimeout = 30 * time.Second

// CreateNamespace creates namespace ns unless it exists.
func (k *Kube) CreateNamespace(t testing.TB, ns string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	_, err := k.clientset.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("testenv: creating namespace %s: %v", ns, err)
	}
}

// CreateServiceAccount creates service account ns/name, and ns if needed: no
// controller-manager runs to create either.
func (k *Kube) CreateServiceAccount(t testing.TB, ns, name string) *corev1.ServiceAccount {
	t.Helper()
	k.CreateNamespace(t, ns)
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	sa, err := k.clientset.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("testenv: creating service account %s/%s: %v", ns, name, err)
	}
	return sa
}

// CreatePod creates pod ns/name running as service account sa, which must
// exist (the ServiceAccount admission plugin checks). No kubelet runs, so the
// pod stays Pending and its image is never pulled; it exists only so tokens
// can be bound to it.
func (k *Kube) CreatePod(t testing.TB, ns, name, sa string) *corev1.Pod {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa,
			Containers:         []corev1.Container{{Name: "app", Image: "registry.invalid/never-pulled"}},
		},
	}
	created, err := k.clientset.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("testenv: creating pod %s/%s: %v", ns, name, err)
	}
	return created
}

// Token mints a token for service account ns/sa with the TokenRequest API.
// audiences nil means the apiserver's default (the issuer); ttl 0 means the
// default of one hour, and the apiserver rejects a ttl under 10 minutes. A
// non-nil boundPod binds the token to that pod: it stops validating once the
// pod is deleted, and TokenReview reports the pod's name and UID.
func (k *Kube) Token(t testing.TB, ns, sa string, audiences []string, ttl time.Duration, boundPod *corev1.Pod) string {
	t.Helper()
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{Audiences: audiences}}
	if ttl != 0 {
		secs := int64(ttl / time.Second)
		req.Spec.ExpirationSeconds = &secs
	}
	if boundPod != nil {
		req.Spec.BoundObjectRef = &authenticationv1.BoundObjectReference{
			Kind: "Pod", APIVersion: "v1", Name: boundPod.Name, UID: boundPod.UID,
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	resp, err := k.clientset.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("testenv: requesting a token for %s/%s: %v", ns, sa, err)
	}
	return resp.Status.Token
}

// MetricValue reads the apiserver's /metrics and returns the sum of metric
// name over the series whose labels include all of labels; for example
// MetricValue(t, "apiserver_request_total", map[string]string{"resource":
// "tokenreviews"}) counts TokenReviews of any verb and code. Histograms and
// summaries contribute their sample count. A metric with no series yet is 0,
// as Prometheus omits vectors nothing has observed.
func (k *Kube) MetricValue(t testing.TB, name string, labels map[string]string) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	raw, err := k.clientset.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		t.Fatalf("testenv: reading /metrics: %v", err)
	}
	v, err := sumMetric(string(raw), name, labels)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return v
}

func sumMetric(text, name string, labels map[string]string) (float64, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		return 0, fmt.Errorf("parsing /metrics: %w", err)
	}
	mf, ok := families[name]
	if !ok {
		return 0, nil
	}
	var sum float64
next:
	for _, m := range mf.GetMetric() {
		have := make(map[string]string, len(m.GetLabel()))
		for _, lp := range m.GetLabel() {
			have[lp.GetName()] = lp.GetValue()
		}
		for k, v := range labels {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Untyped != nil:
			sum += m.GetUntyped().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		case m.Summary != nil:
			sum += float64(m.GetSummary().GetSampleCount())
		}
	}
	return sum, nil
}
