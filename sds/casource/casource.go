// Package casource serves SDS secrets straight from the CA, for proxies that
// talk SDS to meshca server without a node agent ("central mode"): each
// authenticated proxy gets a key generated here and a certificate for its
// own identity, renewed before it expires, and every proxy gets the trust
// bundle, pushed when it changes.
//
// In central mode the workload's private key crosses the network (inside
// the SDS stream's TLS); the node agent, which generates the key next to
// the proxy, avoids that and is the recommended deployment.
//
// With Config.Policy set, it also serves the mesh-wide mTLS policy
// (sds.PolicyName) to the streams that ask for it, node agents, and pushes
// every change. Without, such streams are told the name is unknown
// (sds.ErrNoPolicy): a node agent then knows that no policy will come,
// rather than waiting for one.
package casource

import (
	"context"
	"crypto"
	"crypto/x509"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/sds"
)

// Authority is what the source needs from the CA; *ca.Authority is one.
type Authority interface {
	Issuer() *ca.Issuer
	Changed() <-chan struct{}
	SignKey(ctx context.Context, pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration) (*ca.Issued, error)
}

// syncer is a policy.Source that may not have read the stored policy yet,
// as the stores (policy.Store) and *policy.Live: until it has, it holds
// policy.Default, mTLS off, which nobody chose. Such a source's policy is
// not served before it is synced; agents wait for it. Its Changed fires
// when it syncs.
type syncer interface {
	Synced() bool
}

// Config configures a Source.
type Config struct {
	Authority Authority
	// Policy, when set, is served as sds.PolicyName and followed by Run,
	// once it has read the stored policy if it says when (Synced, as
	// policy.Store). Nil serves no policy: streams asking for it are
	// refused with sds.ErrNoPolicy.
	Policy policy.Source
	// TTL of the certificates it issues; zero means the CA's default.
	TTL time.Duration
	// KeyType of the keys it generates (default ecdsa-p256).
	KeyType keystore.KeyType
	// RenewAt is the fraction of a certificate's lifetime after which it
	// is replaced (default 0.5).
	RenewAt float64
	// RetryInterval spaces attempts after a failed signing (default 10s).
	RetryInterval time.Duration
	// RootsOnly refuses to serve certificates and keys: only the trust
	// bundle, which node agents watch.
	RootsOnly bool
	// RotationJitter spreads the renewals that follow a root activation:
	// each proxy's certificate from the old root is replaced at a random
	// point within it (default 1 minute), so that a rotation does not make
	// every proxy ask at once.
	RotationJitter time.Duration
	// Ledger, when set, records every certificate issued before it is
	// served; a certificate that cannot be recorded is not served.
	Ledger Ledger
	Clock  clockwork.Clock
	Logger *slog.Logger
	// Rand returns a value in [0, 1) for the jitter; nil uses math/rand.
	Rand func() float64
}

// Ledger is the audit ledger.
type Ledger interface {
	Append(ctx context.Context, r audit.Record) (audit.Record, error)
}

// Source implements sds.Source backed by the CA.
type Source struct {
	cfg Config

	// polMu serializes reads of the policy source, so watchers are told of
	// policies in the order they were read.
	polMu sync.Mutex

	mu       sync.Mutex
	watchers map[*watcher]struct{}
	// policy is the policy served, shared by every watcher's snapshot so
	// the server encodes it once; nil until first read.
	policy *policy.Policy
}

var _ sds.Source = (*Source)(nil)

// New validates cfg. Run must run for bundle changes to reach the proxies.
func New(cfg Config) (*Source, error) {
	if cfg.Authority == nil {
		return nil, fmt.Errorf("casource: no authority")
	}
	if cfg.KeyType == "" {
		cfg.KeyType = keystore.ECDSAP256
	}
	if cfg.RenewAt <= 0 || cfg.RenewAt >= 1 {
		cfg.RenewAt = 0.5
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = 10 * time.Second
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.RotationJitter <= 0 {
		cfg.RotationJitter = time.Minute
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Source{cfg: cfg, watchers: make(map[*watcher]struct{})}, nil
}

// Run follows the CA: on every change of issuer or bundle, each watcher gets
// the new bundle, and a certificate whose root has left the bundle is
// replaced at once. A new intermediate alone replaces nothing: the old one
// stays valid for the leaves it signed, and re-signing every proxy at each
// intermediate renewal would be a self-inflicted thundering herd. It
// follows the policy too, when there is one: each change goes to every
// watcher that asked for it.
func (s *Source) Run(ctx context.Context) error {
	for {
		changed := s.cfg.Authority.Changed()
		var policyChanged <-chan struct{}
		if s.cfg.Policy != nil {
			// The channel before the read, so no change falls between.
			policyChanged = s.cfg.Policy.Changed()
			s.refreshPolicy()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-policyChanged:
			continue
		case <-changed:
		}
		iss := s.cfg.Authority.Issuer()
		s.mu.Lock()
		ws := make([]*watcher, 0, len(s.watchers))
		for w := range s.watchers {
			ws = append(ws, w)
		}
		s.mu.Unlock()
		for _, w := range ws {
			w.issuerChanged(iss)
		}
	}
}

// Watch implements sds.Source. A proxy that asks for its certificate must
// have been authenticated: the certificate is for p.ID.
func (s *Source) Watch(_ context.Context, p sds.Peer, want sds.Want, changed func()) (sds.Watcher, error) {
	if want.Policy && s.cfg.Policy == nil {
		return nil, fmt.Errorf("casource: %w", sds.ErrNoPolicy)
	}
	if want.Cert && s.cfg.RootsOnly {
		return nil, fmt.Errorf("casource: this server serves only %q over SDS; run the node agent for %q", sds.RootsName, sds.CertName)
	}
	if want.Cert && p.ID.IsZero() {
		return nil, fmt.Errorf("casource: a certificate is only served to an authenticated proxy")
	}
	w := &watcher{s: s, id: p.ID, peer: p.Addr, cert: want.Cert, wantPolicy: want.Policy, changed: changed}
	iss := s.cfg.Authority.Issuer()
	if iss == nil {
		return nil, ca.ErrNotReady
	}
	var pol *policy.Policy
	if want.Policy {
		// Once read, Run keeps the policy current; until then it is read
		// here, so the first response has it.
		if pol = s.servedPolicy(); pol == nil {
			s.refreshPolicy()
			pol = s.servedPolicy()
		}
	}
	w.snap = &sds.Snapshot{Roots: iss.Roots, Policy: pol}
	if want.Cert {
		// The first certificate is signed here, so a proxy's first response
		// carries it; later ones come from the timer.
		if err := w.renew(); err != nil {
			w.Close()
			return nil, err
		}
	}
	if want.Policy {
		// No read of the policy is under way while w is registered: one
		// done since pol was taken is caught up here, and any later one
		// reaches w, in order.
		s.polMu.Lock()
		defer s.polMu.Unlock()
	}
	s.mu.Lock()
	s.watchers[w] = struct{}{}
	cur := s.policy
	s.mu.Unlock()
	if want.Policy {
		w.policyChanged(cur) // nothing when it is pol
	}
	return w, nil
}

// servedPolicy is the policy last read, nil before the first.
func (s *Source) servedPolicy() *policy.Policy {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.policy
}

// refreshPolicy reads the policy and, when it changed, hands it to every
// watcher that asked for it. A policy that does not validate is not served
// (the stores hand out only valid ones; this guards other sources).
func (s *Source) refreshPolicy() {
	s.polMu.Lock()
	defer s.polMu.Unlock()
	if sy, ok := s.cfg.Policy.(syncer); ok && !sy.Synced() {
		return
	}
	cur, _ := s.cfg.Policy.Current()
	p, err := cur.Normalize()
	if err != nil {
		s.cfg.Logger.Error("mTLS policy not served; keeping the previous one", "err", err)
		return
	}
	s.mu.Lock()
	if s.policy != nil && s.policy.Equal(p) {
		s.mu.Unlock()
		return
	}
	s.policy = &p
	ws := make([]*watcher, 0, len(s.watchers))
	for w := range s.watchers {
		if w.wantPolicy {
			ws = append(ws, w)
		}
	}
	s.mu.Unlock()
	s.cfg.Logger.Info("serving a new mTLS policy", "policy", p.String(), "watchers", len(ws))
	for _, w := range ws {
		w.policyChanged(&p)
	}
}

type watcher struct {
	s          *Source
	id         spiffeid.ID
	peer       string
	cert       bool
	wantPolicy bool
	changed    func()

	mu     sync.Mutex
	snap   *sds.Snapshot     // its Policy is kept across renewals
	root   *x509.Certificate // that snap's leaf chains to
	timer  clockwork.Timer
	at     time.Time // when timer fires
	due    time.Time // when the current certificate is due for renewal
	closed bool
}

func (w *watcher) Snapshot() *sds.Snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.snap
}

func (w *watcher) Close() {
	w.s.mu.Lock()
	delete(w.s.watchers, w)
	w.s.mu.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closed = true
	if w.timer != nil {
		w.timer.Stop()
	}
}

// renew signs a new certificate for a fresh key and schedules the next.
func (w *watcher) renew() error {
	key, err := keystore.Generate(w.s.cfg.KeyType)
	if err != nil {
		return fmt.Errorf("casource: %w", err)
	}
	issued, err := w.s.cfg.Authority.SignKey(context.Background(), key.Public(), w.id, w.s.cfg.TTL)
	if err == nil {
		err = w.record(issued)
	}
	clock := w.s.cfg.Clock
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	if err != nil {
		w.s.cfg.Logger.Error("cannot renew a proxy's certificate; will retry", "spiffe_id", w.id, "err", err, "retry", w.s.cfg.RetryInterval)
		w.schedule(clock.Now().Add(w.s.cfg.RetryInterval))
		return fmt.Errorf("casource: signing for %s: %w", w.id, err)
	}
	leaf := issued.Leaf()
	w.snap = &sds.Snapshot{Chain: issued.Chain, Key: key, Roots: issued.Roots, Policy: w.snap.Policy}
	w.root = issued.Root
	w.schedule(ca.RenewalPoint(leaf.NotBefore, leaf.NotAfter, clock.Now(), w.s.cfg.RenewAt))
	w.due = w.at
	return nil
}

// record writes the issuance to the ledger, synced, before it is served.
func (w *watcher) record(issued *ca.Issued) error {
	if w.s.cfg.Ledger == nil {
		return nil
	}
	rec, err := audit.Issuance(issued.Chain, issued.Root)
	if err != nil {
		return err
	}
	rec.SPIFFEID, rec.Peer = w.id.String(), w.peer
	if ns, sa, ok := identity.WorkloadOf(w.id); ok {
		rec.Namespace, rec.ServiceAccount = ns, sa
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := w.s.cfg.Ledger.Append(ctx, rec); err != nil {
		return fmt.Errorf("the audit ledger is unavailable, so the certificate is not served: %w", err)
	}
	return nil
}

// schedule arms the renewal timer for at; w.mu is held.
func (w *watcher) schedule(at time.Time) {
	if w.timer != nil {
		w.timer.Stop()
	}
	w.at = at
	w.timer = w.s.cfg.Clock.AfterFunc(at.Sub(w.s.cfg.Clock.Now()), func() {
		if w.renew() == nil {
			w.changed()
		}
	})
}

// policyChanged serves p from now on.
func (w *watcher) policyChanged(p *policy.Policy) {
	w.mu.Lock()
	if w.closed || w.snap.Policy == p {
		w.mu.Unlock()
		return
	}
	next := *w.snap
	next.Policy = p
	w.snap = &next
	w.mu.Unlock()
	w.changed()
}

// issuerChanged updates the bundle and replaces a certificate whose root
// is no longer trusted at once, and one whose root no longer signs (a root
// was activated: iss.Roots[0] is the signing root) at a random point within
// RotationJitter, or sooner if it was due anyway.
func (w *watcher) issuerChanged(iss *ca.Issuer) {
	if iss == nil {
		return
	}
	w.mu.Lock()
	stale := w.cert && (w.root == nil || !slices.ContainsFunc(iss.Roots, w.root.Equal))
	if !stale {
		next := *w.snap
		next.Roots = iss.Roots
		w.snap = &next
		if w.cert && !w.closed && !w.root.Equal(iss.Roots[0]) {
			clock := w.s.cfg.Clock
			at := clock.Now().Add(time.Duration(w.s.cfg.Rand() * float64(w.s.cfg.RotationJitter)))
			if len(w.snap.Chain) > 0 && at.Before(w.due) {
				w.schedule(at)
			}
		}
	}
	w.mu.Unlock()
	if stale {
		if w.renew() != nil {
			return
		}
	}
	w.changed()
}
