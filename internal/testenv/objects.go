package testenv

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"os"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
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

// CreateService creates Service ns/name, selecting pods labelled app=name,
// and one EndpointSlice holding addrs, each backed by the pod of the same
// index in pods ("" for none), as the controller-manager (not running
// here) would. pods has one entry per address.
func (k *Kube) CreateService(t testing.TB, ns, name string, addrs, pods []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	_, err := k.clientset.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{{Port: 8080}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("testenv: creating service %s/%s: %v", ns, name, err)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for i, a := range addrs {
		ep := discoveryv1.Endpoint{Addresses: []string{a}}
		if pods[i] != "" {
			ep.TargetRef = &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: pods[i]}
		}
		slice.Endpoints = append(slice.Endpoints, ep)
	}
	if _, err := k.clientset.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatalf("testenv: creating the EndpointSlice of service %s/%s: %v", ns, name, err)
	}
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

// AdminToken returns the static token of the admin user, a user that is not
// a service account.
func (k *Kube) AdminToken() string { return k.token }

// SignToken signs a service-account token for sa with the cluster's own
// signing key, as the TokenRequest API would, but with any validity: the
// API refuses lifetimes under 10 minutes and times in the past, and tests of
// expiry need both. A non-nil pod binds the token to it.
func (k *Kube) SignToken(t testing.TB, sa *corev1.ServiceAccount, audiences []string, pod *corev1.Pod, notBefore, expiry time.Time) string {
	t.Helper()
	raw, err := os.ReadFile(k.path("sa.key"))
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	block, _ := pem.Decode(raw)
	if block == nil {
		t.Fatalf("testenv: no PEM in the service-account key")
	}
	key, err := x509.ParsePKCS1PrivateKey(block.Bytes)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	// The API server looks a signing key up by the key ID it derives from
	// the public key.
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	sum := sha256.Sum256(der)
	kid := base64.RawURLEncoding.EncodeToString(sum[:])
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key}, (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", kid))
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	type ref struct {
		Name string `json:"name"`
		UID  string `json:"uid"`
	}
	private := map[string]any{
		"namespace":      sa.Namespace,
		"serviceaccount": ref{Name: sa.Name, UID: string(sa.UID)},
	}
	if pod != nil {
		private["pod"] = ref{Name: pod.Name, UID: string(pod.UID)}
	}
	tok, err := jwt.Signed(signer).Claims(jwt.Claims{
		Issuer:    Issuer,
		Subject:   "system:serviceaccount:" + sa.Namespace + ":" + sa.Name,
		Audience:  jwt.Audience(audiences),
		NotBefore: jwt.NewNumericDate(notBefore),
		IssuedAt:  jwt.NewNumericDate(notBefore),
		Expiry:    jwt.NewNumericDate(expiry),
	}).Claims(map[string]any{"kubernetes.io": private}).Serialize()
	if err != nil {
		t.Fatalf("testenv: signing a token: %v", err)
	}
	return tok
}

// ConfigFor returns a client configuration that acts as service account
// ns/sa, holding only the permissions RBAC grants it.
func (k *Kube) ConfigFor(t testing.TB, ns, sa string) *rest.Config {
	t.Helper()
	return &rest.Config{
		Host:            k.host(),
		BearerToken:     k.Token(t, ns, sa, nil, time.Hour, nil),
		TLSClientConfig: rest.TLSClientConfig{CAFile: k.caFile},
	}
}

// KubeconfigFor returns a kubeconfig, as bytes with the CA inlined, that
// acts as service account ns/sa: what a remote-cluster Secret holds.
func (k *Kube) KubeconfigFor(t testing.TB, ns, sa string) []byte {
	t.Helper()
	ca, err := os.ReadFile(k.caFile)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["c"] = &clientcmdapi.Cluster{Server: k.host(), CertificateAuthorityData: ca}
	cfg.AuthInfos["u"] = &clientcmdapi.AuthInfo{Token: k.Token(t, ns, sa, nil, time.Hour, nil)}
	cfg.Contexts["c"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "u"}
	cfg.CurrentContext = "c"
	out, err := clientcmd.Write(*cfg)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return out
}

// Grant binds ClusterRole role to service account ns/sa cluster-wide.
func (k *Kube) Grant(t testing.TB, ns, sa, role string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	_, err := k.clientset.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{GenerateName: sa + "-"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: sa}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("testenv: binding %s to %s/%s: %v", role, ns, sa, err)
	}
}

// Delete deletes an object through the admin clientset and fails the test
// on error; kind is "pod" or "serviceaccount".
func (k *Kube) Delete(t testing.TB, kind, ns, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	// No kubelet runs to confirm termination, so pods go at once.
	opts := metav1.DeleteOptions{GracePeriodSeconds: new(int64)}
	var err error
	switch kind {
	case "pod":
		err = k.clientset.CoreV1().Pods(ns).Delete(ctx, name, opts)
	case "serviceaccount":
		err = k.clientset.CoreV1().ServiceAccounts(ns).Delete(ctx, name, opts)
	default:
		t.Fatalf("testenv: Delete: unknown kind %q", kind)
	}
	if err != nil {
		t.Fatalf("testenv: deleting %s %s/%s: %v", kind, ns, name, err)
	}
}
