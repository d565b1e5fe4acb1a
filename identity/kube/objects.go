package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	"golang.org/x/sync/singleflight"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	toolscache "k8s.io/client-go/tools/cache"
)

// ErrGone means the object a token is bound to no longer exists: it was
// deleted, or replaced by a new object of the same name (another UID).
var ErrGone = errors.New("kube: object no longer exists")

// Objects answers whether the objects a token is bound to still exist. The
// API server checks them when it reviews a token; Objects lets a cached
// review be revoked the moment its pod or service account goes.
type Objects interface {
	// Pod returns the node of pod ns/name if it exists with uid.
	Pod(ctx context.Context, ns, name, uid string) (node string, err error)
	// ServiceAccount returns nil if service account ns/name exists with uid.
	ServiceAccount(ctx context.Context, ns, name, uid string) error
}

// IndexConfig configures an Index.
type IndexConfig struct {
	Client kubernetes.Interface
	// Cluster names the cluster in metrics and logs.
	Cluster string
	// AbsentTTL is how long a confirmed absence is remembered, so a token
	// for a deleted pod presented in a loop costs one API call, not one per
	// request (default 10s).
	AbsentTTL time.Duration
	Clock     clockwork.Clock
	Logger    *slog.Logger
	Metrics   *Metrics
}

// Index implements Objects with shared informers over pods and service
// accounts: a lookup is a map read, not an API call. An object the informer
// has not seen (just created, or the watch lags) is fetched once from the API
// server, which has the final word.
type Index struct {
	cfg     IndexConfig
	factory informers.SharedInformerFactory
	pods    kindIndex
	sas     kindIndex
	flight  singleflight.Group
	absent  *absentSet
}

// kindIndex looks one kind of object up in the informer and, failing that,
// in the API server. Both return the object's UID and, for pods, its node.
type kindIndex struct {
	kind   string
	synced toolscache.InformerSynced
	cached func(ns, name string) (uid, node string, err error)
	live   func(ctx context.Context, ns, name string) (uid, node string, err error)
}

// NewIndex prepares the informers; Run starts them.
func NewIndex(cfg IndexConfig) (*Index, error) {
	if cfg.Client == nil {
		return nil, fmt.Errorf("kube: index needs a client")
	}
	if cfg.AbsentTTL <= 0 {
		cfg.AbsentTTL = 10 * time.Second
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	f := informers.NewSharedInformerFactoryWithOptions(cfg.Client, 0, informers.WithTransform(slim))
	podInf := f.Core().V1().Pods()
	saInf := f.Core().V1().ServiceAccounts()
	x := &Index{cfg: cfg, factory: f, absent: newAbsentSet(10000)}
	core := cfg.Client.CoreV1()
	x.pods = kindIndex{
		kind:   "pod",
		synced: podInf.Informer().HasSynced,
		cached: func(ns, name string) (string, string, error) {
			p, err := podInf.Lister().Pods(ns).Get(name)
			if err != nil {
				return "", "", err
			}
			return string(p.UID), p.Spec.NodeName, nil
		},
		live: func(ctx context.Context, ns, name string) (string, string, error) {
			p, err := core.Pods(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return "", "", err
			}
			return string(p.UID), p.Spec.NodeName, nil
		},
	}
	x.sas = kindIndex{
		kind:   "serviceaccount",
		synced: saInf.Informer().HasSynced,
		cached: func(ns, name string) (string, string, error) {
			sa, err := saInf.Lister().ServiceAccounts(ns).Get(name)
			if err != nil {
				return "", "", err
			}
			return string(sa.UID), "", nil
		},
		live: func(ctx context.Context, ns, name string) (string, string, error) {
			sa, err := core.ServiceAccounts(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return "", "", err
			}
			return string(sa.UID), "", nil
		},
	}
	return x, nil
}

// slim keeps only what binding checks read, so watching every pod of a large
// cluster costs a few hundred bytes per pod.
func slim(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: o.Name, Namespace: o.Namespace, UID: o.UID, ResourceVersion: o.ResourceVersion},
			Spec:       corev1.PodSpec{NodeName: o.Spec.NodeName},
		}, nil
	case *corev1.ServiceAccount:
		return &corev1.ServiceAccount{
			ObjectMeta: metav1.ObjectMeta{Name: o.Name, Namespace: o.Namespace, UID: o.UID, ResourceVersion: o.ResourceVersion},
		}, nil
	}
	return obj, nil
}

// Run starts the informers and blocks until ctx ends.
func (x *Index) Run(ctx context.Context) error {
	x.factory.Start(ctx.Done())
	<-ctx.Done()
	x.factory.Shutdown()
	return nil
}

// Synced reports whether both informers have listed their objects once.
func (x *Index) Synced() bool { return x.pods.synced() && x.sas.synced() }

// WaitForSync blocks until Synced or ctx ends.
func (x *Index) WaitForSync(ctx context.Context) error {
	if !toolscache.WaitForCacheSync(ctx.Done(), x.pods.synced, x.sas.synced) {
		return fmt.Errorf("kube: informers of cluster %q not synced: %w", x.cfg.Cluster, context.Cause(ctx))
	}
	return nil
}

// Pod implements Objects.
func (x *Index) Pod(ctx context.Context, ns, name, uid string) (string, error) {
	return x.lookup(ctx, &x.pods, ns, name, uid)
}

// ServiceAccount implements Objects.
func (x *Index) ServiceAccount(ctx context.Context, ns, name, uid string) error {
	_, err := x.lookup(ctx, &x.sas, ns, name, uid)
	return err
}

func (x *Index) lookup(ctx context.Context, k *kindIndex, ns, name, uid string) (string, error) {
	if k.synced() {
		if got, node, err := k.cached(ns, name); err == nil && got == uid {
			x.cfg.Metrics.lookups.WithLabelValues(x.cfg.Cluster, k.kind, "informer").Inc()
			return node, nil
		}
	}
	key := k.kind + "/" + ns + "/" + name + "/" + uid
	if x.absent.has(key, x.cfg.Clock.Now()) {
		x.cfg.Metrics.lookups.WithLabelValues(x.cfg.Cluster, k.kind, "absent").Inc()
		return "", k.gone(ns, name, uid)
	}
	x.cfg.Metrics.lookups.WithLabelValues(x.cfg.Cluster, k.kind, "api").Inc()
	v, err, _ := x.flight.Do(key, func() (any, error) {
		gctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), reviewTimeout)
		defer cancel()
		got, node, err := k.live(gctx, ns, name)
		switch {
		case apierrors.IsNotFound(err) || err == nil && got != uid:
			x.absent.add(key, x.cfg.Clock.Now().Add(x.cfg.AbsentTTL))
			return "", k.gone(ns, name, uid)
		case err != nil:
			return "", fmt.Errorf("kube: looking up %s %s/%s: %w", k.kind, ns, name, err)
		}
		return node, nil
	})
	if err != nil {
		return "", err
	}
	return v.(string), nil
}

func (k *kindIndex) gone(ns, name, uid string) error {
	return fmt.Errorf("%w: %s %s/%s (uid %s)", ErrGone, k.kind, ns, name, uid)
}

// absentSet remembers confirmed absences until they expire, bounded in size.
type absentSet struct {
	mu    sync.Mutex
	max   int
	until map[string]time.Time
}

func newAbsentSet(max int) *absentSet {
	return &absentSet{max: max, until: make(map[string]time.Time)}
}

func (s *absentSet) has(key string, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.until[key]
	if ok && !now.Before(t) {
		delete(s.until, key)
		return false
	}
	return ok
}

func (s *absentSet) add(key string, until time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.until) >= s.max {
		// Forgetting an absence only costs one more API call later.
		clear(s.until)
	}
	s.until[key] = until
}
