package kubestore

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"

	"github.com/meshca/meshca/internal/policy"
)

// requestTimeout bounds each API call Update makes.
const requestTimeout = 10 * time.Second

// DefaultRetry is how often Update starts over after losing a race: enough
// for a handful of writers racing, with jitter so they spread out.
var DefaultRetry = wait.Backoff{Steps: 10, Duration: 10 * time.Millisecond, Factor: 1.5, Jitter: 0.5}

// Config configures a Store.
type Config struct {
	Client kubernetes.Interface
	// Namespace and Name of the ConfigMap.
	Namespace, Name string
	// Retry paces Update's attempts after conflicts (default DefaultRetry).
	Retry   wait.Backoff
	Logger  *slog.Logger
	Metrics *policy.Metrics
}

// Store implements policy.Store on one ConfigMap.
type Store struct {
	*policy.Live
	cfg      Config
	factory  informers.SharedInformerFactory
	informer toolscache.SharedIndexInformer
	lister   listersv1.ConfigMapNamespaceLister
	// syncMu makes reading the cache and installing what was read one
	// step, so the sync after the initial list cannot install an object
	// older than the one an event handler installed meanwhile.
	syncMu sync.Mutex
}

var _ policy.Store = (*Store)(nil)

// New prepares the informer; Run starts it.
func New(cfg Config) (*Store, error) {
	if cfg.Client == nil || cfg.Namespace == "" || cfg.Name == "" {
		return nil, fmt.Errorf("kubestore: a client, a namespace and a name are required")
	}
	if cfg.Retry.Steps == 0 {
		cfg.Retry = DefaultRetry
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = policy.NewMetrics(nil)
	}
	cfg.Logger = cfg.Logger.With("configmap", cfg.Namespace+"/"+cfg.Name)
	// Watch the one object, not the namespace.
	f := informers.NewSharedInformerFactoryWithOptions(cfg.Client, 0,
		informers.WithNamespace(cfg.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", cfg.Name).String()
		}))
	inf := f.Core().V1().ConfigMaps()
	s := &Store{
		Live:     policy.NewLive(cfg.Logger, cfg.Metrics),
		cfg:      cfg,
		factory:  f,
		informer: inf.Informer(),
		lister:   inf.Lister().ConfigMaps(cfg.Namespace),
	}
	return s, nil
}

// Run starts the informer and blocks until ctx ends.
func (s *Store) Run(ctx context.Context) error {
	// Every event rereads the object from the informer's cache, which is
	// already up to date when handlers run, so events cannot be applied
	// out of order.
	reg, err := s.informer.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { s.sync() },
		UpdateFunc: func(any, any) { s.sync() },
		DeleteFunc: func(any) { s.sync() },
	})
	if err != nil {
		return fmt.Errorf("kubestore: %w", err)
	}
	s.factory.Start(ctx.Done())
	defer s.factory.Shutdown()
	// An absent ConfigMap produces no event; look once the list is in.
	if toolscache.WaitForCacheSync(ctx.Done(), reg.HasSynced) {
		s.sync()
	}
	<-ctx.Done()
	return nil
}

// sync installs the cached ConfigMap's policy, or Default when there is none.
func (s *Store) sync() {
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	cm, err := s.lister.Get(s.cfg.Name)
	switch {
	case apierrors.IsNotFound(err):
		if _, rev := s.Current(); rev != "" {
			s.cfg.Logger.Warn("mTLS policy ConfigMap deleted; the default policy applies")
		}
		s.Set(policy.Default(), "")
	case err != nil:
		s.Fail(fmt.Errorf("kubestore: %w", err))
	default:
		p, err := policy.ParseConfigMap(cm.Data)
		if err != nil {
			s.Reject(policy.Revision(cm.ResourceVersion), fmt.Errorf("kubestore: configmap %s/%s: %w", s.cfg.Namespace, s.cfg.Name, err))
			return
		}
		s.Set(p, policy.Revision(cm.ResourceVersion))
	}
}

// Update implements policy.Store. It reads the ConfigMap from the API
// server, not the informer, so that an attempt starts from the newest
// version; it creates the ConfigMap if there is none. The returned policy
// is what was stored; Current shows it once the watch delivers it.
func (s *Store) Update(ctx context.Context, mutate func(policy.Policy) (policy.Policy, error)) (policy.Policy, error) {
	var out policy.Policy
	err := retry.OnError(s.cfg.Retry, lostRace, func() error {
		var err error
		out, err = s.attempt(ctx, mutate)
		if lostRace(err) {
			s.cfg.Metrics.Conflict()
			s.cfg.Logger.Debug("mTLS policy update lost a race; retrying", "error", err)
		}
		return err
	})
	if lostRace(err) {
		return policy.Policy{}, fmt.Errorf("kubestore: configmap %s/%s: still conflicting after %d attempts: %w", s.cfg.Namespace, s.cfg.Name, s.cfg.Retry.Steps, err)
	}
	if err != nil {
		return policy.Policy{}, err
	}
	return out, nil
}

// lostRace reports whether a write failed because another writer changed
// or created the ConfigMap first: Update starts over on a fresh read.
func lostRace(err error) bool {
	return apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err)
}

// attempt is one read-modify-write. It returns API errors unwrapped so
// Update can recognise conflicts.
func (s *Store) attempt(ctx context.Context, mutate func(policy.Policy) (policy.Policy, error)) (policy.Policy, error) {
	cms := s.cfg.Client.CoreV1().ConfigMaps(s.cfg.Namespace)
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	cm, err := cms.Get(rctx, s.cfg.Name, metav1.GetOptions{})
	absent := apierrors.IsNotFound(err)
	if err != nil && !absent {
		return policy.Policy{}, fmt.Errorf("kubestore: reading configmap %s/%s: %w", s.cfg.Namespace, s.cfg.Name, err)
	}
	cur := policy.Default()
	if !absent {
		if cur, err = policy.ParseConfigMap(cm.Data); err != nil {
			return policy.Policy{}, fmt.Errorf("kubestore: configmap %s/%s: %w; not updating it, fix it by hand: %w", s.cfg.Namespace, s.cfg.Name, policy.ErrMalformed, err)
		}
	}
	next, err := mutate(cur)
	if err != nil {
		return policy.Policy{}, err
	}
	if next, err = next.Normalize(); err != nil {
		return policy.Policy{}, err
	}
	if !absent && next.Equal(cur) {
		return next, nil
	}
	if absent {
		cm = &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: s.cfg.Namespace, Name: s.cfg.Name}}
	} else {
		cm = cm.DeepCopy()
	}
	if cm.Data, err = policy.FormatConfigMap(cm.Data, next); err != nil {
		return policy.Policy{}, err
	}
	if absent {
		_, err = cms.Create(rctx, cm, metav1.CreateOptions{FieldManager: "meshca"})
	} else {
		_, err = cms.Update(rctx, cm, metav1.UpdateOptions{FieldManager: "meshca"})
	}
	if err != nil {
		if lostRace(err) {
			return policy.Policy{}, err
		}
		return policy.Policy{}, fmt.Errorf("kubestore: writing configmap %s/%s: %w", s.cfg.Namespace, s.cfg.Name, err)
	}
	return next, nil
}
