package kubestate

import (
	"bytes"
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Defaults of BundleConfig: the name and key Istio's agents and meshca's
// read the roots from.
const (
	DefaultBundleName = "meshca-root-cert"
	DefaultBundleKey  = "root-cert.pem"
)

// BundleConfig configures a BundleConfigMap.
type BundleConfig struct {
	Client    kubernetes.Interface
	Namespace string
	// Name of the ConfigMap (default DefaultBundleName) and the key that
	// holds the PEM roots (default DefaultBundleKey).
	Name, Key string
}

// BundleConfigMap publishes the trust bundle in a ConfigMap, where
// operators and workloads that cannot reach meshca yet read the roots that
// authenticate it.
type BundleConfigMap struct{ cfg BundleConfig }

// NewBundleConfigMap validates cfg. It calls nothing.
func NewBundleConfigMap(cfg BundleConfig) (*BundleConfigMap, error) {
	if cfg.Client == nil || cfg.Namespace == "" {
		return nil, fmt.Errorf("kubestate: a client and a namespace are required")
	}
	if cfg.Name == "" {
		cfg.Name = DefaultBundleName
	}
	if cfg.Key == "" {
		cfg.Key = DefaultBundleKey
	}
	return &BundleConfigMap{cfg: cfg}, nil
}

// Publish makes the ConfigMap hold pem, creating it if needed, and reports
// whether it wrote. Other keys and labels are kept. A concurrent writer
// makes it fail with a conflict; the caller publishes again.
func (b *BundleConfigMap) Publish(ctx context.Context, pem []byte) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	cms := b.cfg.Client.CoreV1().ConfigMaps(b.cfg.Namespace)
	cur, err := cms.Get(ctx, b.cfg.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Namespace: b.cfg.Namespace, Name: b.cfg.Name, Labels: labels(componentBundle)},
			Data:       map[string]string{b.cfg.Key: string(pem)},
		}, metav1.CreateOptions{})
		if err != nil {
			return false, fmt.Errorf("kubestate: creating %s: %w", b.describe(), err)
		}
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("kubestate: reading %s: %w", b.describe(), err)
	}
	if bytes.Equal([]byte(cur.Data[b.cfg.Key]), pem) {
		return false, nil
	}
	next := cur.DeepCopy()
	if next.Data == nil {
		next.Data = map[string]string{}
	}
	next.Data[b.cfg.Key] = string(pem)
	addLabels(&next.ObjectMeta, componentBundle)
	// The update carries cur's resourceVersion: a writer in between makes
	// it fail rather than be overwritten with what it did not see.
	if _, err := cms.Update(ctx, next, metav1.UpdateOptions{}); err != nil {
		return false, fmt.Errorf("kubestate: writing %s: %w", b.describe(), err)
	}
	return true, nil
}

func (b *BundleConfigMap) describe() string {
	return "configmap " + b.cfg.Namespace + "/" + b.cfg.Name
}
