package policy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
)

// Revision identifies one stored version of the policy: a content hash for
// FileStore, the resourceVersion for the ConfigMap store. It is opaque;
// compare revisions only for equality. The zero Revision means nothing is
// stored (the policy is Default) or nothing has been read yet.
type Revision string

// Source gives the current policy and tells when it changes. Renderers
// depend on this alone.
type Source interface {
	// Current returns the last good policy, normalized, and its revision.
	Current() (Policy, Revision)
	// Changed returns a channel closed at the next change of Current, or
	// when the store first syncs (Current may then be unchanged: nothing
	// stored is Default). Take it before calling Current so no change
	// falls between them.
	Changed() <-chan struct{}
}

// Store is a durable, live Source that can be edited.
type Store interface {
	Source
	// Update applies mutate to the stored policy and stores the result,
	// retrying with a fresh read when another writer got there first, so
	// no concurrent edit is lost; mutate may therefore run more than once.
	// An error from mutate, or an invalid result, stores nothing.
	Update(ctx context.Context, mutate func(Policy) (Policy, error)) (Policy, error)
	// Run follows the stored policy until ctx ends.
	Run(ctx context.Context) error
	// Synced reports whether the stored policy has been read once.
	Synced() bool
	// WaitForSync blocks until Synced or ctx ends.
	WaitForSync(ctx context.Context) error
	// Status tells what the store last saw of its backing object.
	Status() Status
}

// ErrMalformed is wrapped by Update's refusal to edit a stored policy that
// does not parse: the request may be fine, the stored object needs fixing
// by hand first. Such errors also wrap the ErrInvalid of the parse, so test
// for ErrMalformed first.
var ErrMalformed = errors.New("policy: the stored policy is malformed")

// Status is what a store last saw of its backing object, for health pages.
type Status struct {
	Revision Revision // of the policy in force
	// Err is why the newest stored version was not applied (malformed),
	// or nil when the policy in force is the newest.
	Err error
	// ErrRevision is the revision Err is about.
	ErrRevision Revision
}

// Live holds a store's last good policy and announces its changes. Stores
// embed it; on its own it is a Source whose policy is set by hand, which
// suits tests of consumers.
type Live struct {
	log     *slog.Logger
	metrics *Metrics

	mu      sync.Mutex
	policy  Policy
	rev     Revision
	synced  bool
	syncCh  chan struct{}
	changed chan struct{}
	status  Status
}

// NewLive returns a Live holding Default until the first Set. Nil log and
// metrics get defaults.
func NewLive(log *slog.Logger, m *Metrics) *Live {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if m == nil {
		m = NewMetrics(nil)
	}
	return &Live{
		log:     log,
		metrics: m,
		policy:  Default(),
		syncCh:  make(chan struct{}),
		changed: make(chan struct{}),
	}
}

// Static returns a Source that always gives p.
func Static(p Policy) (Source, error) {
	n, err := p.Normalize()
	if err != nil {
		return nil, err
	}
	l := NewLive(nil, nil)
	l.Set(n, "static")
	return l, nil
}

var _ Source = (*Live)(nil)

// Current implements Source. It returns a copy: callers may modify it.
func (l *Live) Current() (Policy, Revision) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return clonePolicy(l.policy), l.rev
}

// Changed implements Source.
func (l *Live) Changed() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.changed
}

// Set installs a normalized policy read at rev, marks the store synced and
// clears any error. It reports whether anything changed; only then, or
// when the store first syncs, are Changed's waiters woken: a first read
// that finds nothing stored leaves Default in place, yet makes it the
// policy someone chose.
func (l *Live) Set(p Policy, rev Revision) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	first := !l.synced
	l.markSynced()
	l.status = Status{Revision: rev}
	l.metrics.valid.Set(1)
	if rev == l.rev && p.Equal(l.policy) {
		if first {
			l.wake()
		}
		return false
	}
	old := l.policy
	l.policy, l.rev = clonePolicy(p), rev
	l.metrics.applied(p)
	if !old.Equal(p) {
		l.log.Info("mTLS policy changed", "revision", rev, "policy", p.String(), "was", old.String())
	}
	l.wake()
	return true
}

// wake closes the channel Changed gave out and makes the next; l.mu is held.
func (l *Live) wake() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// Reject records that the stored version at rev is malformed. The last good
// policy stays in force. A store whose object is malformed from the start
// does not become synced: a server waiting for it should not start with a
// policy nobody wrote.
func (l *Live) Reject(rev Revision, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.status.Err != nil && l.status.ErrRevision == rev {
		return // the same bad version seen again, e.g. at the next poll
	}
	l.status.Err, l.status.ErrRevision = err, rev
	l.metrics.parseErrors.Inc()
	l.metrics.valid.Set(0)
	l.log.Error("mTLS policy not applied; keeping the last good one", "revision", rev, "error", err, "in_force", l.rev)
}

// Fail records that the stored policy could not be read at all (an I/O
// error, say). It logs once per distinct error and changes nothing else.
func (l *Live) Fail(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.status.Err != nil && l.status.ErrRevision == "" && l.status.Err.Error() == err.Error() {
		return
	}
	l.status.Err, l.status.ErrRevision = err, ""
	l.log.Error("mTLS policy unreadable; keeping the last good one", "error", err, "in_force", l.rev)
}

// Status returns what the store last saw.
func (l *Live) Status() Status {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.status
}

// Synced reports whether a good stored version, or its absence, has been
// read.
func (l *Live) Synced() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.synced
}

// WaitForSync blocks until Synced or ctx ends.
func (l *Live) WaitForSync(ctx context.Context) error {
	select {
	case <-l.syncCh:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("policy: not synced: %w", context.Cause(ctx))
	}
}

func (l *Live) markSynced() {
	if !l.synced {
		l.synced = true
		close(l.syncCh)
	}
}

func clonePolicy(p Policy) Policy {
	p.Excluded = append([]string(nil), p.Excluded...)
	if len(p.Excluded) == 0 {
		p.Excluded = nil
	}
	return p
}
