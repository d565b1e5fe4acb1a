package multicluster

import (
	"context"
	"fmt"
	"log/slog"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// DefaultSecretSelector picks the Secrets that hold remote clusters'
// kubeconfigs.
const DefaultSecretSelector = "meshca/multi-cluster=true"

// Sink receives the clusters each source provides; *Router is one.
type Sink interface {
	SetSource(source string, kubeconfigs map[string][]byte)
}

// SecretsConfig configures a SecretWatcher.
type SecretsConfig struct {
	Client kubernetes.Interface
	// Namespace to watch: meshca's own. Reading Secrets is never granted
	// cluster-wide.
	Namespace string
	// Selector is a label selector (default DefaultSecretSelector).
	Selector string
	Sink     Sink
	Logger   *slog.Logger
}

// SecretWatcher feeds the kubeconfigs in labelled Secrets to a Sink as they
// are created, changed and deleted.
type SecretWatcher struct {
	cfg SecretsConfig
}

// NewSecretWatcher validates cfg; Run starts watching.
func NewSecretWatcher(cfg SecretsConfig) (*SecretWatcher, error) {
	if cfg.Client == nil || cfg.Namespace == "" || cfg.Sink == nil {
		return nil, fmt.Errorf("multicluster: the secret watcher needs a client, a namespace and a sink")
	}
	if cfg.Selector == "" {
		cfg.Selector = DefaultSecretSelector
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &SecretWatcher{cfg: cfg}, nil
}

// Run watches until ctx ends.
func (w *SecretWatcher) Run(ctx context.Context) error {
	f := informers.NewSharedInformerFactoryWithOptions(w.cfg.Client, 0,
		informers.WithNamespace(w.cfg.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = w.cfg.Selector }))
	inf := f.Core().V1().Secrets().Informer()
	_, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { w.set(obj) },
		UpdateFunc: func(_, obj any) { w.set(obj) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(toolscache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if s, ok := obj.(*corev1.Secret); ok {
				w.cfg.Sink.SetSource(source(s), nil)
			}
		},
	})
	if err != nil {
		return fmt.Errorf("multicluster: %w", err)
	}
	f.Start(ctx.Done())
	<-ctx.Done()
	f.Shutdown()
	return nil
}

func (w *SecretWatcher) set(obj any) {
	s, ok := obj.(*corev1.Secret)
	if !ok {
		return
	}
	kcs := make(map[string][]byte, len(s.Data))
	for id, kc := range s.Data {
		if err := CheckKubeconfig(kc); err != nil {
			w.cfg.Logger.Error("ignoring cluster", "cluster", id, "secret", source(s), "err", err)
			continue
		}
		kcs[id] = kc
	}
	w.cfg.Sink.SetSource(source(s), kcs)
}

func source(s *corev1.Secret) string { return "secret/" + s.Namespace + "/" + s.Name }

// CheckKubeconfig refuses kubeconfigs that would make meshca run a program
// or a credential plugin: anyone who can write a Secret in meshca's
// namespace must not be able to execute code in its process.
func CheckKubeconfig(kc []byte) error {
	cfg, err := clientcmd.Load(kc)
	if err != nil {
		return fmt.Errorf("multicluster: not a kubeconfig: %w", err)
	}
	for name, ai := range cfg.AuthInfos {
		if ai.Exec != nil || ai.AuthProvider != nil {
			return fmt.Errorf("multicluster: kubeconfig user %q uses a credential plugin, which meshca refuses in Secrets", name)
		}
		if ai.TokenFile != "" || ai.ClientCertificate != "" || ai.ClientKey != "" {
			return fmt.Errorf("multicluster: kubeconfig user %q reads files from meshca's disk, which meshca refuses in Secrets", name)
		}
	}
	return nil
}
