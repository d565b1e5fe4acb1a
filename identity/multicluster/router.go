package multicluster

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/meshca/meshca/identity"
)

// Member authenticates the tokens of one cluster; *kube.Cluster is one.
type Member interface {
	identity.Authenticator
	// CheckAccess fails when meshca's credentials lack a permission.
	CheckAccess(ctx context.Context) error
	// Run runs the member's informers until ctx ends.
	Run(ctx context.Context) error
}

// Builder makes a member for cluster id from its kubeconfig.
type Builder func(id string, kubeconfig []byte) (Member, error)

// Config configures a Router.
type Config struct {
	// LocalID is the ID of the cluster meshca runs in; credentials naming
	// no cluster go to it.
	LocalID string
	// Build makes members from the kubeconfigs of SetSource.
	Build Builder
	// RetryInterval spaces access checks of a member that failed one
	// (default 30s).
	RetryInterval time.Duration
	Clock         clockwork.Clock
	Logger        *slog.Logger
}

// Router implements identity.Authenticator over a changing set of clusters.
type Router struct {
	cfg Config

	mu      sync.RWMutex
	members map[string]*member
	runCtx  context.Context // nil until Run
	wg      sync.WaitGroup
}

type member struct {
	id, source string
	digest     [sha256.Size]byte // of the kubeconfig, to skip no-op updates
	m          Member

	mu     sync.RWMutex
	err    error // why the member cannot serve yet; nil once it can
	cancel context.CancelFunc
}

func (m *member) usable() error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.err
}

func (m *member) setErr(err error) {
	m.mu.Lock()
	m.err = err
	m.mu.Unlock()
}

var errNotChecked = errors.New("its permissions have not been checked yet")

// New returns an empty Router.
func New(cfg Config) (*Router, error) {
	if cfg.LocalID == "" {
		return nil, fmt.Errorf("multicluster: the local cluster needs an ID")
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = 30 * time.Second
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Router{cfg: cfg, members: make(map[string]*member)}, nil
}

// Add checks m's access now and adds it as cluster id; an error leaves the
// router unchanged. Start-up uses it so that a cluster meshca cannot use
// stops meshca from starting, with the reason.
func (r *Router) Add(ctx context.Context, id string, m Member) error {
	if id == "" {
		return fmt.Errorf("multicluster: empty cluster ID")
	}
	if err := m.CheckAccess(ctx); err != nil {
		return fmt.Errorf("multicluster: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.members[id]; ok {
		return fmt.Errorf("multicluster: cluster %q configured twice", id)
	}
	mem := &member{id: id, source: "static", m: m}
	r.members[id] = mem
	if r.runCtx != nil {
		r.start(mem, true)
	}
	return nil
}

// SetSource replaces the clusters that source (for example one Secret)
// provides with kubeconfigs, keyed by cluster ID; nil removes them all.
// Members are built at once and become usable when their access check
// passes; until then their workloads are told the cluster is unavailable.
func (r *Router) SetSource(source string, kubeconfigs map[string][]byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for id, mem := range r.members {
		if mem.source != source {
			continue
		}
		if kc, ok := kubeconfigs[id]; ok && sha256.Sum256(kc) == mem.digest {
			continue
		}
		r.stop(mem)
		delete(r.members, id)
		r.cfg.Logger.Info("removed cluster", "cluster", id, "source", source)
	}
	for _, id := range slices.Sorted(maps.Keys(kubeconfigs)) {
		kc := kubeconfigs[id]
		if old, ok := r.members[id]; ok {
			if old.source != source {
				r.cfg.Logger.Error("cluster configured twice; keeping the first", "cluster", id, "source", source, "first", old.source)
			}
			continue
		}
		m, err := r.cfg.Build(id, kc)
		if err != nil {
			r.cfg.Logger.Error("cannot use cluster", "cluster", id, "source", source, "err", err)
			continue
		}
		mem := &member{id: id, source: source, digest: sha256.Sum256(kc), m: m, err: errNotChecked}
		r.members[id] = mem
		r.cfg.Logger.Info("added cluster", "cluster", id, "source", source)
		if r.runCtx != nil {
			r.start(mem, false)
		}
	}
}

// Run runs every member until ctx ends, and those added later too.
func (r *Router) Run(ctx context.Context) error {
	r.mu.Lock()
	if r.runCtx != nil {
		r.mu.Unlock()
		return fmt.Errorf("multicluster: Run called twice")
	}
	r.runCtx = ctx
	for _, mem := range r.members {
		r.start(mem, mem.usable() == nil)
	}
	r.mu.Unlock()
	<-ctx.Done()
	r.wg.Wait()
	return nil
}

// start runs mem in its own goroutine; r.mu is held.
func (r *Router) start(mem *member, checked bool) {
	ctx, cancel := context.WithCancel(r.runCtx)
	mem.cancel = cancel
	r.wg.Go(func() {
		if !checked && !r.checkUntilAllowed(ctx, mem) {
			return
		}
		if err := mem.m.Run(ctx); err != nil {
			r.cfg.Logger.Error("cluster stopped", "cluster", mem.id, "err", err)
		}
	})
}

func (r *Router) checkUntilAllowed(ctx context.Context, mem *member) bool {
	for {
		err := mem.m.CheckAccess(ctx)
		if err == nil {
			mem.setErr(nil)
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		mem.setErr(err)
		r.cfg.Logger.Error("cluster not usable; will check again", "cluster", mem.id, "err", err, "retry", r.cfg.RetryInterval)
		select {
		case <-ctx.Done():
			return false
		case <-r.cfg.Clock.After(r.cfg.RetryInterval):
		}
	}
}

// stop cancels mem without waiting: its informers shut down on their own.
func (r *Router) stop(mem *member) {
	if mem.cancel != nil {
		mem.cancel()
	}
}

// Clusters lists the configured cluster IDs and whether each is usable.
func (r *Router) Clusters() map[string]error {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make(map[string]error, len(r.members))
	for id, mem := range r.members {
		out[id] = mem.usable()
	}
	return out
}

// Authenticate implements identity.Authenticator: the credential goes to the
// cluster it names, or to the local cluster when it names none.
func (r *Router) Authenticate(ctx context.Context, cred identity.Credential) (identity.Caller, error) {
	id := cred.ClusterID
	if id == "" {
		id = r.cfg.LocalID
	}
	r.mu.RLock()
	mem, ok := r.members[id]
	var known []string
	if !ok {
		known = slices.Sorted(maps.Keys(r.members))
	}
	r.mu.RUnlock()
	if !ok {
		return identity.Caller{}, identity.Deny(identity.ReasonUnknownCluster,
			"unknown cluster %q (this server knows %s)", id, strings.Join(known, ", "))
	}
	if err := mem.usable(); err != nil {
		return identity.Caller{}, identity.Deny(identity.ReasonUnavailable, "cluster %q is configured but not usable: %v", id, err)
	}
	cred.ClusterID = id
	return mem.m.Authenticate(ctx, cred)
}
