package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/keystore"
)

// Source provides and maintains the issuer: a CA whose keys meshca manages
// itself (SelfManaged) or one an operator plugs in as files (PluggedIn).
type Source interface {
	// Load returns the issuer to start with.
	Load(ctx context.Context, now time.Time) (*Issuer, error)
	// Maintain is called periodically with the issuer in use. It returns a
	// replacement (a renewed intermediate, reloaded files) or nil when
	// nothing changed.
	Maintain(ctx context.Context, now time.Time, current *Issuer) (*Issuer, error)
}

// Config configures an Authority.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	// TrustDomainAliases are former or alternative names of TrustDomain
	// that CSRs may use; certificates are always issued in TrustDomain.
	TrustDomainAliases []spiffeid.TrustDomain
	Source             Source
	TTL                TTLPolicy // zero value: DefaultTTLPolicy
	// MaintainInterval is how often Source.Maintain runs (default 10s).
	MaintainInterval time.Duration
	// RetryMin and RetryMax pace the retries of a failed maintenance pass
	// (a keystore that is down): the first comes after RetryMin, each next
	// one after twice the delay, up to RetryMax. Defaults 1s and 1m.
	RetryMin, RetryMax time.Duration
	Clock              clockwork.Clock
	Logger             *slog.Logger
	Metrics            prometheus.Registerer
}

// Authority issues X.509-SVIDs.
type Authority struct {
	cfg     Config
	clock   clockwork.Clock
	log     *slog.Logger
	metrics *metrics

	state atomic.Pointer[state]

	// opMu orders changes of issuer: maintenance and rotation steps must
	// not install their results out of order.
	opMu sync.Mutex

	mu      sync.Mutex
	changed chan struct{}
	// failing is the maintenance failure in progress, if any.
	failing *Failure
}

// Failure describes maintenance that keeps failing: the issuer in use
// stays until it expires, and renewal is retried.
type Failure struct {
	Since     time.Time
	Attempts  int
	Err       error
	NextRetry time.Time
}

// state is what signing needs, derived once per issuer change.
type state struct {
	issuer *Issuer
	bundle *x509bundle.Bundle
}

// New validates cfg and returns an Authority. It starts nothing; call Init
// before issuing and Run to keep the issuer fresh.
func New(cfg Config) (*Authority, error) {
	if cfg.TrustDomain.IsZero() {
		return nil, fmt.Errorf("ca: trust domain is required")
	}
	if cfg.Source == nil {
		return nil, fmt.Errorf("ca: a CA source is required")
	}
	if cfg.TTL == (TTLPolicy{}) {
		cfg.TTL = DefaultTTLPolicy
	}
	if err := cfg.TTL.Validate(); err != nil {
		return nil, err
	}
	if cfg.MaintainInterval <= 0 {
		cfg.MaintainInterval = 10 * time.Second
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = time.Second
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = time.Minute
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Authority{
		cfg:     cfg,
		clock:   cfg.Clock,
		log:     cfg.Logger,
		metrics: newMetrics(cfg.Metrics),
		changed: make(chan struct{}),
	}, nil
}

// Init loads the issuer and refuses it when it cannot cover the configured
// leaf lifetimes.
func (a *Authority) Init(ctx context.Context) error {
	now := a.clock.Now()
	iss, err := a.cfg.Source.Load(ctx, now)
	if err != nil {
		return err
	}
	if err := a.accept(iss, now); err != nil {
		return err
	}
	a.install(iss)
	return nil
}

// Run keeps the issuer fresh until ctx ends. A failed pass is logged and
// retried with backoff; the current issuer keeps signing meanwhile, so a
// keystore outage stops renewals, not issuance.
func (a *Authority) Run(ctx context.Context) error {
	t := a.clock.NewTimer(a.cfg.MaintainInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.Chan():
		}
		delay := a.cfg.MaintainInterval
		if err := a.Maintain(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			delay = a.failed(err)
		} else {
			a.recovered()
		}
		t.Reset(delay)
	}
}

// failed records a failed pass and returns the delay before the next.
func (a *Authority) failed(err error) time.Duration {
	now := a.clock.Now()
	a.metrics.maintainErrors.Inc()
	a.metrics.maintainFailing.Set(1)
	a.mu.Lock()
	defer a.mu.Unlock()
	f := a.failing
	if f == nil {
		f = &Failure{Since: now}
	} else {
		f = &Failure{Since: f.Since, Attempts: f.Attempts}
	}
	f.Attempts++
	f.Err = err
	delay := a.cfg.RetryMin
	for i := 1; i < f.Attempts && delay < a.cfg.RetryMax; i++ {
		delay *= 2
	}
	delay = min(delay, a.cfg.RetryMax)
	f.NextRetry = now.Add(delay)
	a.failing = f
	iss := a.Issuer()
	a.log.Error("CA maintenance failed; still signing with the current issuer", "err", err,
		"attempts", f.Attempts, "failingSince", f.Since, "retryIn", delay, "issuerNotAfter", iss.Cert.NotAfter)
	return delay
}

func (a *Authority) recovered() {
	a.mu.Lock()
	f := a.failing
	a.failing = nil
	a.mu.Unlock()
	if f != nil {
		a.metrics.maintainFailing.Set(0)
		a.log.Info("CA maintenance recovered", "failedAttempts", f.Attempts, "failingSince", f.Since)
	}
}

// Failing returns the maintenance failure in progress, or nil.
func (a *Authority) Failing() *Failure {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.failing
}

// Maintain runs one maintenance pass: renewal or reload.
func (a *Authority) Maintain(ctx context.Context) error {
	a.opMu.Lock()
	defer a.opMu.Unlock()
	cur := a.state.Load()
	if cur == nil {
		return ErrNotReady
	}
	now := a.clock.Now()
	next, err := a.cfg.Source.Maintain(ctx, now, cur.issuer)
	if err != nil || next == nil {
		return err
	}
	if err := a.accept(next, now); err != nil {
		return fmt.Errorf("ca: refusing new issuer: %w", err)
	}
	a.install(next)
	a.log.Info("CA issuer changed", "subject", next.Cert.Subject.String(),
		"notAfter", next.Cert.NotAfter, "roots", len(next.Roots))
	return nil
}

func (a *Authority) accept(iss *Issuer, now time.Time) error {
	if err := iss.Verify(now); err != nil {
		return err
	}
	return a.cfg.TTL.CheckCoverage(now, iss.Cert.NotAfter, iss.Cert.Subject.String())
}

func (a *Authority) install(iss *Issuer) {
	b := x509bundle.FromX509Authorities(a.cfg.TrustDomain, iss.Roots)
	a.state.Store(&state{issuer: iss, bundle: b})
	a.metrics.issuerChanges.Inc()
	a.metrics.intermExpiry.Set(float64(iss.Cert.NotAfter.Unix()))
	earliest := iss.Roots[0].NotAfter
	for _, r := range iss.Roots[1:] {
		if r.NotAfter.Before(earliest) {
			earliest = r.NotAfter
		}
	}
	a.metrics.rootExpiry.Set(float64(earliest.Unix()))

	a.mu.Lock()
	close(a.changed)
	a.changed = make(chan struct{})
	a.mu.Unlock()
}

// Rotation returns the state of the root rotation, or ErrRotationUnsupported
// when the CA's root is not meshca's to rotate.
func (a *Authority) Rotation() (Rotation, error) {
	r, ok := a.cfg.Source.(RootRotator)
	if !ok {
		return Rotation{}, ErrRotationUnsupported
	}
	return r.Rotation()
}

// Rotate performs one root rotation step (see SelfManaged.Rotate) and
// installs the resulting issuer. The step is durable before it takes
// effect; if the new issuer is then refused, the error says so and the
// next restart or step starts from the recorded phase.
func (a *Authority) Rotate(ctx context.Context, step Step) (Rotation, error) {
	r, ok := a.cfg.Source.(RootRotator)
	if !ok {
		return Rotation{}, ErrRotationUnsupported
	}
	a.opMu.Lock()
	defer a.opMu.Unlock()
	if a.state.Load() == nil {
		return Rotation{}, ErrNotReady
	}
	now := a.clock.Now()
	iss, err := r.Rotate(ctx, now, step)
	if errors.Is(err, keystore.ErrUnavailable) {
		return Rotation{}, fmt.Errorf("ca: rotation step %s needs the root keystore, which is unavailable; nothing changed, retry once it is back: %w", step, err)
	}
	if err != nil {
		return Rotation{}, err
	}
	if err := a.accept(iss, now); err != nil {
		return Rotation{}, fmt.Errorf("ca: rotation step %s recorded, but its issuer is refused: %w", step, err)
	}
	a.install(iss)
	a.log.Info("root rotation step done", "step", step, "signingRoot", Fingerprint(iss.Roots[0]), "roots", len(iss.Roots))
	return r.Rotation()
}

// Changed returns a channel closed at the next change of issuer or bundle.
func (a *Authority) Changed() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.changed
}

// Ready reports whether the authority can sign.
func (a *Authority) Ready() bool { return a.state.Load() != nil }

// Issuer returns the current issuer, or nil before Init.
func (a *Authority) Issuer() *Issuer {
	if s := a.state.Load(); s != nil {
		return s.issuer
	}
	return nil
}

// Bundle returns the current trust bundle, or nil before Init.
func (a *Authority) Bundle() *x509bundle.Bundle {
	if s := a.state.Load(); s != nil {
		return s.bundle
	}
	return nil
}

// TrustDomain is the trust domain the authority issues for.
func (a *Authority) TrustDomain() spiffeid.TrustDomain { return a.cfg.TrustDomain }

// Request asks for a workload certificate.
type Request struct {
	// CSR in PEM or DER. Only its public key is used; see CheckCSR.
	CSR []byte
	// ID is the caller's authenticated identity.
	ID spiffeid.ID
	// TTL is the requested lifetime; zero means the default.
	TTL time.Duration
}

// Issued is a signed, verified certificate with what a workload needs to use
// it.
type Issued struct {
	// Chain runs from the leaf up to, not including, the root.
	Chain []*x509.Certificate
	// Root is the trust anchor the chain verified to; Roots is the whole
	// trust bundle, which holds more than one root during a rotation.
	Root  *x509.Certificate
	Roots []*x509.Certificate
	// Clamped reports a lifetime shorter than requested.
	Clamped bool
}

// Leaf returns the issued certificate.
func (i *Issued) Leaf() *x509.Certificate { return i.Chain[0] }

// Issue checks the CSR against the caller's identity and signs a leaf for it.
func (a *Authority) Issue(ctx context.Context, req Request) (*Issued, error) {
	csr, err := ParseCSR(req.CSR)
	if err != nil {
		return nil, err
	}
	if err := CheckCSR(csr, req.ID, a.cfg.TrustDomainAliases...); err != nil {
		return nil, err
	}
	return a.SignKey(ctx, csr.PublicKey, req.ID, req.TTL)
}

// SignKey issues a leaf for pub, which the caller has already vetted (for
// example a key meshca generated itself).
func (a *Authority) SignKey(_ context.Context, pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration) (*Issued, error) {
	return a.sign(id, pub, ttl, "workload", func(serial *big.Int, v Validity) (*x509.Certificate, error) {
		return LeafTemplate(id, pub, serial, v)
	})
}

// IssueServing issues meshca's own TLS serving certificate.
func (a *Authority) IssueServing(_ context.Context, pub crypto.PublicKey, id spiffeid.ID, dnsNames []string, ips []net.IP, ttl time.Duration) (*Issued, error) {
	return a.sign(id, pub, ttl, "serving", func(serial *big.Int, v Validity) (*x509.Certificate, error) {
		return ServingTemplate(id, dnsNames, ips, pub, serial, v)
	})
}

// sign runs the issuance steps: validity, template, signature, and
// re-verification of the result against the current bundle, so a broken
// issuer or template can never hand out a chain peers would reject.
func (a *Authority) sign(id spiffeid.ID, pub crypto.PublicKey, ttl time.Duration, kind string,
	build func(*big.Int, Validity) (*x509.Certificate, error)) (*Issued, error) {
	st := a.state.Load()
	if st == nil {
		return nil, ErrNotReady
	}
	if id.TrustDomain() != a.cfg.TrustDomain {
		return nil, fmt.Errorf("%w: %s is not in trust domain %s", ErrForeignTrustDomain, id, a.cfg.TrustDomain)
	}
	if err := CheckPublicKey(pub); err != nil {
		return nil, err
	}
	began := time.Now() // latency metric only: real time, not the injected clock
	now := a.clock.Now()
	v, clamped := a.cfg.TTL.LeafValidity(now, ttl, st.issuer.Validity())
	serial, err := NewSerial(rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl, err := build(serial, v)
	if err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, st.issuer.Cert, pub, st.issuer.Signer)
	if err != nil {
		return nil, fmt.Errorf("ca: sign: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: parse issued certificate: %w", err)
	}
	chain := make([]*x509.Certificate, 0, 1+len(st.issuer.Chain))
	chain = append(chain, leaf)
	chain = append(chain, st.issuer.Chain...)
	got, verified, err := x509svid.Verify(chain, st.bundle, x509svid.WithTime(now))
	if err != nil {
		return nil, fmt.Errorf("ca: issued certificate failed verification: %w", err)
	}
	if got != id {
		return nil, fmt.Errorf("ca: issued certificate carries %s, want %s", got, id)
	}
	a.metrics.signSeconds.Observe(time.Since(began).Seconds())
	a.metrics.issued.WithLabelValues(kind).Inc()
	if clamped {
		a.metrics.clamped.Inc()
	}
	anchor := verified[0][len(verified[0])-1]
	return &Issued{Chain: chain, Root: anchor, Roots: st.issuer.Roots, Clamped: clamped}, nil
}
