package kubestate_test

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/internal/kubestate"
	"github.com/meshca/meshca/internal/testenv"
)

// TestBundleConfigMapAgainstAPIServer: the first publish creates the
// ConfigMap, an unchanged bundle writes nothing, a new one replaces the
// key and keeps the others.
func TestBundleConfigMapAgainstAPIServer(t *testing.T) {
	kube := testenv.StartKube(t)
	kube.CreateNamespace(t, ns)
	admin := kube.Clientset()
	b, err := kubestate.NewBundleConfigMap(kubestate.BundleConfig{Client: admin, Namespace: ns})
	if err != nil {
		t.Fatal(err)
	}
	get := func() *corev1.ConfigMap {
		t.Helper()
		cm, err := admin.CoreV1().ConfigMaps(ns).Get(t.Context(), kubestate.DefaultBundleName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return cm
	}
	publish := func(pem string, wantWrote bool) {
		t.Helper()
		wrote, err := b.Publish(t.Context(), []byte(pem))
		if err != nil || wrote != wantWrote {
			t.Fatalf("Publish(%q) = %v, %v; want wrote=%v", pem, wrote, err, wantWrote)
		}
	}

	publish("roots A", true)
	cm := get()
	if cm.Data[kubestate.DefaultBundleKey] != "roots A" || cm.Labels["app.kubernetes.io/component"] != "trust-bundle" {
		t.Fatalf("created %+v", cm)
	}
	publish("roots A", false)
	if again := get(); again.ResourceVersion != cm.ResourceVersion {
		t.Errorf("an unchanged bundle was written: version %s -> %s", cm.ResourceVersion, again.ResourceVersion)
	}

	cm.Data["note"] = "kept"
	if _, err := admin.CoreV1().ConfigMaps(ns).Update(t.Context(), cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	publish("roots A\nroots B", true)
	if got := get().Data; got[kubestate.DefaultBundleKey] != "roots A\nroots B" || got["note"] != "kept" {
		t.Errorf("after a new bundle: %v", got)
	}
}

func TestNewBundleConfigMapNeedsClientAndNamespace(t *testing.T) {
	if _, err := kubestate.NewBundleConfigMap(kubestate.BundleConfig{Namespace: ns}); err == nil {
		t.Error("no client: accepted")
	}
}
