package sds

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/internal/policy"
)

// Peer is a connected proxy.
type Peer struct {
	// ID is the proxy's authenticated identity; zero when Config.Authenticate
	// is the default, which trusts every caller (a local Unix socket).
	ID spiffeid.ID
	// Node is the Envoy node ID from the proxy's first request. The proxy
	// chooses it, so it is for status and logs only.
	Node string
	// Addr is the proxy's network address.
	Addr string
}

// Want says which resources a stream asked for, so a source that signs per
// proxy signs only for streams that asked for "default", and follows the
// policy only for those that asked for it.
type Want struct {
	Cert, Roots, Policy bool
}

// ErrNoPolicy is what a Source's Watch returns (wrapped) when asked for the
// policy it has none of: the server then answers as for an unknown
// resource name, as a server without the policy resource does, so a node
// agent can tell "none configured" from "not yet".
var ErrNoPolicy = errors.New("sds: no mTLS policy is served")

// Snapshot is what one proxy is served. It is immutable once handed over.
type Snapshot struct {
	// Chain runs from the workload's leaf up to, not including, the root;
	// Key is the leaf's private key. An empty Chain means no certificate:
	// "default" is not served (delta streams that had it are told it was
	// removed).
	Chain []*x509.Certificate
	Key   crypto.Signer
	// Roots is the trust bundle. Empty means "ROOTCA" is not served.
	Roots []*x509.Certificate
	// Policy is the mesh-wide mTLS policy. Nil means PolicyName is not
	// served (yet). Sources that serve many watchers should share one
	// pointer: the encoding is found by it.
	Policy *policy.Policy
}

// Source supplies each proxy's secrets.
type Source interface {
	// Watch starts following the secrets of proxy p. The source calls
	// changed whenever what the watcher's Snapshot returns has changed, until
	// the watcher is closed; changed never blocks. ctx ends with the stream.
	Watch(ctx context.Context, p Peer, want Want, changed func()) (Watcher, error)
}

// Watcher is one stream's view of a Source.
type Watcher interface {
	// Snapshot returns the current secrets, or nil while there are none yet.
	Snapshot() *Snapshot
	// Close stops the notifications.
	Close()
}

// Broadcaster is a Source that serves the same secrets to every proxy: the
// node agent's single local identity, or a test's. Set pushes to every
// watcher. The zero value is ready to use.
type Broadcaster struct {
	snap atomic.Pointer[Snapshot]

	mu       sync.Mutex
	watchers map[*broadcastWatcher]struct{}
}

// NewBroadcaster returns an empty Broadcaster.
func NewBroadcaster() *Broadcaster { return &Broadcaster{} }

// Set validates s, makes it current and notifies every watcher.
func (b *Broadcaster) Set(s Snapshot) error {
	if err := s.validate(); err != nil {
		return err
	}
	s.Chain = append([]*x509.Certificate(nil), s.Chain...)
	s.Roots = append([]*x509.Certificate(nil), s.Roots...)
	if s.Policy != nil {
		// A normalized copy: the caller may change its own.
		p, _ := s.Policy.Normalize() // validate checked it
		s.Policy = &p
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.snap.Store(&s)
	// Under the lock, so a watcher closed before Set returns is never called
	// afterwards. changed is non-blocking: 10,000 calls take well under a
	// millisecond.
	for w := range b.watchers {
		w.changed()
	}
	return nil
}

// Snapshot returns the current secrets, or nil before the first Set.
func (b *Broadcaster) Snapshot() *Snapshot { return b.snap.Load() }

// Watch implements Source; every proxy gets the same secrets.
func (b *Broadcaster) Watch(_ context.Context, _ Peer, _ Want, changed func()) (Watcher, error) {
	w := &broadcastWatcher{b: b, changed: changed}
	b.mu.Lock()
	if b.watchers == nil {
		b.watchers = make(map[*broadcastWatcher]struct{})
	}
	b.watchers[w] = struct{}{}
	b.mu.Unlock()
	return w, nil
}

type broadcastWatcher struct {
	b       *Broadcaster
	changed func()
}

func (w *broadcastWatcher) Snapshot() *Snapshot { return w.b.snap.Load() }

func (w *broadcastWatcher) Close() {
	w.b.mu.Lock()
	delete(w.b.watchers, w)
	w.b.mu.Unlock()
}

// validate refuses a snapshot the server could not encode, so the mistake
// surfaces where it is made rather than on every stream.
func (s *Snapshot) validate() error {
	if s.Policy != nil {
		if err := s.Policy.Validate(); err != nil {
			return fmt.Errorf("sds: %w", err)
		}
	}
	for _, c := range s.Roots {
		if c == nil {
			return fmt.Errorf("sds: nil root certificate")
		}
	}
	if len(s.Chain) == 0 {
		return nil
	}
	for _, c := range s.Chain {
		if c == nil {
			return fmt.Errorf("sds: nil certificate in chain")
		}
	}
	if s.Key == nil {
		return fmt.Errorf("sds: a certificate chain needs its private key")
	}
	if _, err := encodeKey(s.Key, s.Chain[0]); err != nil {
		return err
	}
	return nil
}
