package peers

import (
	"context"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/sds"
)

// View is the replicas' shared view of proxies and certificates: this
// replica's live SDS streams and ledger, with the other replicas' entries
// as last read from the ConfigMap. It is rotation.Proxies and
// rotation.Ledger, and only the Publisher that made it updates it.
type View struct {
	local  rotation.Proxies
	ledger rotation.Ledger
	clock  clockwork.Clock
	// what names the ConfigMap in errors.
	what     string
	freshFor time.Duration

	mu     sync.Mutex
	peers  map[string]*peer // by replica identity, this replica's excluded
	readAt time.Time        // of the last successful read
	// readErr is the last read's failure; nil once a read succeeds.
	readErr error
	changed chan struct{}
}

var (
	_ rotation.Proxies = (*View)(nil)
	_ rotation.Ledger  = (*View)(nil)
)

// peer is another replica's entry as last read.
type peer struct {
	raw []byte
	// e is nil when raw could not be decoded; err says why.
	e     *entry
	err   error
	fresh bool // as of the last read, to notice it turning stale
}

func newView(local rotation.Proxies, ledger rotation.Ledger, clock clockwork.Clock, what string, freshFor time.Duration) *View {
	return &View{local: local, ledger: ledger, clock: clock, what: what, freshFor: freshFor,
		peers: map[string]*peer{}, changed: make(chan struct{})}
}

// Status lists this replica's streams and the ROOTCA streams of the
// replicas whose entries are fresh. Other replicas' streams carry what the
// gate needs only: identity, node, since, subscribed to ROOTCA alone, the
// ACKed and rejected roots and the last NACK. A replica's entry goes stale
// when it has not been rewritten for FreshFor: a replica that died took its
// streams with it, and its proxies show up where they reconnect.
func (v *View) Status() []sds.StreamStatus {
	out := v.local.Status()
	now := v.clock.Now()
	v.mu.Lock()
	for _, id := range slices.Sorted(maps.Keys(v.peers)) {
		if p := v.peers[id]; p.e != nil && v.isFresh(p.e, now) {
			out = append(out, p.e.streams...)
		}
	}
	v.mu.Unlock()
	sort.SliceStable(out, func(i, j int) bool { return out[i].Since.Before(out[j].Since) })
	return out
}

// AckChanged returns a channel closed at the next change of this
// replica's streams or of another replica's entry as far as the gate is
// concerned (streams, holdings, freshness), or when the ConfigMap becomes
// readable or unreadable.
func (v *View) AckChanged() <-chan struct{} {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.changed
}

// Valid lists the certificates valid at at that this replica's ledger
// knows and that every other replica's entry lists, fresh or stale: a
// certificate lives until it expires, whether or not its issuer does. It
// fails, and with it every rotation gate, when the ConfigMap could not be
// read (at the last attempt, or not for FreshFor), or another replica's
// entry cannot be decoded: what the others hold would be unknown.
func (v *View) Valid(ctx context.Context, at time.Time) ([]rotation.Holding, error) {
	if err := v.readable(); err != nil {
		return nil, err
	}
	out, err := v.ledger.Valid(ctx, at)
	if err != nil {
		return nil, err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, id := range slices.Sorted(maps.Keys(v.peers)) {
		p := v.peers[id]
		if p.e == nil {
			return nil, fmt.Errorf("peers: the entry of replica %q in %s cannot be read (%v), so what it issued is unknown; "+
				"delete that key once the replica is gone", id, v.what, p.err)
		}
		for _, h := range p.e.holdings {
			if at.Before(h.NotAfter) {
				out = append(out, h)
			}
		}
	}
	return out, nil
}

// readable says why the view cannot be trusted, if it cannot.
func (v *View) readable() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	switch {
	case v.readErr != nil:
		return fmt.Errorf("peers: reading %s: %w", v.what, v.readErr)
	case v.readAt.IsZero():
		return fmt.Errorf("peers: %s has not been read yet", v.what)
	}
	if age := v.clock.Since(v.readAt); age > v.freshFor {
		return fmt.Errorf("peers: %s was last read %s ago, at %s", v.what, age.Round(time.Second), v.readAt.UTC().Format(time.RFC3339))
	}
	return nil
}

func (v *View) isFresh(e *entry, now time.Time) bool {
	return now.Sub(e.updatedAt) <= v.freshFor
}

// wake closes the channel AckChanged handed out. v.mu is held.
func (v *View) wake() {
	close(v.changed)
	v.changed = make(chan struct{})
}

// localChanged passes a change of this replica's streams on.
func (v *View) localChanged() {
	v.mu.Lock()
	v.wake()
	v.mu.Unlock()
}

// readFailed records a failed read of the ConfigMap.
func (v *View) readFailed(err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.readErr == nil {
		v.wake()
	}
	v.readErr = err
}

// observe takes in the other replicas' entries, as just read (binaryData
// of the ConfigMap, nil when it does not exist), decoding only those that
// changed, and wakes AckChanged's waiters if anything the gate reads did.
func (v *View) observe(self string, data map[string][]byte, now time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	changed := v.readErr != nil || v.readAt.IsZero()
	v.readErr, v.readAt = nil, now
	for id := range v.peers {
		if _, ok := data[id]; !ok || id == self {
			delete(v.peers, id)
			changed = true
		}
	}
	for id, raw := range data {
		if id == self {
			continue
		}
		old := v.peers[id]
		if old != nil && slices.Equal(old.raw, raw) {
			if old.e != nil && old.fresh != v.isFresh(old.e, now) {
				old.fresh = !old.fresh
				changed = true
			}
			continue
		}
		p := &peer{raw: raw}
		p.e, p.err = decode(raw)
		if p.e != nil {
			p.fresh = v.isFresh(p.e, now)
		}
		if old == nil || !samePeer(old, p) {
			changed = true
		}
		v.peers[id] = p
	}
	if changed {
		v.wake()
	}
}

// samePeer reports whether the gate would read a and b alike.
func samePeer(a, b *peer) bool {
	if a.e == nil || b.e == nil {
		return a.e == nil && b.e == nil
	}
	return a.fresh == b.fresh && reflect.DeepEqual(a.e.streams, b.e.streams) && reflect.DeepEqual(a.e.holdings, b.e.holdings)
}

// removable lists the entries of other replicas that are stale and hold no
// certificate valid at now: nothing of them is left to count. Entries that
// cannot be decoded stay.
func (v *View) removable(now time.Time) []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	var out []string
	for id, p := range v.peers {
		if p.e == nil || v.isFresh(p.e, now) {
			continue
		}
		if !slices.ContainsFunc(p.e.holdings, func(h rotation.Holding) bool { return now.Before(h.NotAfter) }) {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// counts returns how many other replicas' entries are fresh, stale and
// unreadable.
func (v *View) counts(now time.Time) (fresh, stale, unreadable int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, p := range v.peers {
		switch {
		case p.e == nil:
			unreadable++
		case v.isFresh(p.e, now):
			fresh++
		default:
			stale++
		}
	}
	return fresh, stale, unreadable
}
