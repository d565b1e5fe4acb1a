package kubestate

import (
	"maps"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Components of meshca's objects, in their app.kubernetes.io/component
// label.
const (
	componentJournal = "ca-journal"
	componentKeys    = "ca-keys"
	componentBundle  = "trust-bundle"
)

// labels mark an object as meshca's component, for kubectl and for backups
// that select by label.
func labels(component string) map[string]string {
	return map[string]string{
		"app.kubernetes.io/name":      "meshca",
		"app.kubernetes.io/component": component,
	}
}

// addLabels adds meshca's labels for component to meta, keeping the others.
func addLabels(meta *metav1.ObjectMeta, component string) {
	if meta.Labels == nil {
		meta.Labels = map[string]string{}
	}
	maps.Copy(meta.Labels, labels(component))
}

// secretToWrite returns the Secret to store, with a non-nil Data for the
// caller to edit: a copy of cur, keeping its other keys, labels and
// annotations and its resourceVersion, so that updating it is conditional;
// or a new Secret to create when cur is nil.
func secretToWrite(cur *corev1.Secret, namespace, name, component string) *corev1.Secret {
	next := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Type:       corev1.SecretTypeOpaque,
	}
	if cur != nil {
		next = cur.DeepCopy()
	}
	if next.Data == nil {
		next.Data = map[string][]byte{}
	}
	addLabels(&next.ObjectMeta, component)
	return next
}
