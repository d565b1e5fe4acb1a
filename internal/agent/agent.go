// Package agent is meshca's node agent. It runs next to one Envoy proxy and
// keeps it supplied with the workload's identity:
//
//   - it obtains the workload certificate from a meshca server over Istio's
//     CA API (internal/caclient: the key is generated here and never leaves
//     the agent), authenticating with the pod's service-account token, read
//     again for every request because the kubelet rotates it;
//   - it serves the certificate ("default") and the trust bundle ("ROOTCA")
//     to Envoy over SDS on a Unix socket (the sds package, with a
//     Broadcaster as its source);
//   - it renews at a jittered fraction of the certificate's lifetime, keeps
//     serving the current certificate while renewal fails, retries with
//     backoff, and withdraws the certificate once it expires so Envoy is
//     never handed an expired one;
//   - it keeps a ROOTCA-only SDS stream open to the server, so a new trust
//     bundle reaches Envoy at once rather than at the next renewal, and the
//     agent's own trust in the server and in the chains it issues follows
//     the same bundle. It ACKs a bundle to the server only once every local
//     stream watching ROOTCA has ACKed it, and NACKs it when one of them
//     does, so the server's ACK accounting (what a root rotation waits on)
//     speaks for the proxies behind the agent;
//   - with Config.EnvoyConfigDir, it enforces the mesh's mTLS policy: it
//     subscribes to the policy (sds.PolicyName) on the same stream, renders
//     the proxy's listeners and clusters from it (internal/policy/
//     envoyconfig) into files Envoy watches, on every change, and ACKs the
//     policy upstream once the files are written, or NACKs it with the
//     reason, keeping the last good configuration. Until the first policy
//     arrives it writes nothing, since any guess could open plaintext where
//     the mesh requires mTLS; after Config.PolicyWait, or at once when the
//     server serves no policy, it keeps what an earlier run left or writes
//     the fail-closed FallbackPolicy.
package agent

import (
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/sds"
)

// Defaults for the zero values of Config.
const (
	DefaultRenewAt  = 0.5
	DefaultJitter   = 0.1
	DefaultRetryMin = time.Second
	DefaultRetryMax = 30 * time.Second
	// DefaultRotationWindow spreads the renewals that follow a root
	// activation.
	DefaultRotationWindow = time.Minute
)

// backoffJitter is the largest share of a retry delay taken off at random,
// so agents that failed together (a server restart) do not retry in step.
const backoffJitter = 0.25

// ErrNoCertificate is what Ready reports while the agent has no valid
// certificate to serve.
var ErrNoCertificate = errors.New("agent: no valid workload certificate")

// Config configures an Agent.
type Config struct {
	// ServerAddr is the meshca server's gRPC address (CA API and SDS, over
	// TLS), such as "meshca.meshca-system.svc:15012". Required.
	ServerAddr string
	// TrustBundle holds the roots trusted at start, to authenticate the
	// server and the chains it issues. The server's ROOTCA stream replaces
	// them. Required.
	TrustBundle []*x509.Certificate
	// ServerName is checked against the server's certificate; empty means
	// the host in ServerAddr.
	ServerName string
	// ClusterID, when set, is sent as "clusterid" metadata so a
	// multi-cluster server picks the right token reviewer.
	ClusterID string
	// TokenFile is the pod's projected service-account token. It is read
	// again for every certificate request and every stream. Required.
	TokenFile string
	// KeyType of the workload key; empty means ecdsa-p256.
	KeyType keystore.KeyType
	// TTL is the lifetime to ask for; zero leaves it to the server.
	TTL time.Duration
	// SocketPath is the Unix socket Envoy reaches SDS on. Its directory is
	// created (0700) when missing. Required.
	SocketPath string
	// RenewAt is the fraction of the certificate's lifetime at which to
	// renew, and Jitter how far either side of it renewal may fall at
	// random: renewal is at start + lifetime × (RenewAt ± Jitter), the
	// lifetime counted from when the certificate arrived (ca.RenewalPoint).
	// Zero means DefaultRenewAt and DefaultJitter; a negative Jitter means
	// none.
	RenewAt float64
	Jitter  float64
	// RetryMin is the delay before the first retry after a failure, doubled
	// for each further failure up to RetryMax. Each delay is shortened by up
	// to a quarter at random. Zero means DefaultRetryMin and
	// DefaultRetryMax. The same backoff paces reconnections of the ROOTCA
	// stream.
	RetryMin time.Duration
	RetryMax time.Duration
	// RotationWindow: when the server's trust bundle names a new signing
	// root (its first; a root rotation was activated) and the current
	// certificate chains to another, the agent renews at a random point
	// within this window rather than at its usual time, so that agents do
	// not all ask at once. Zero means DefaultRotationWindow.
	RotationWindow time.Duration
	// EnvoyConfigDir, when set, is where the agent writes the proxy's Envoy
	// configuration, rendered from Proxy and the mesh's mTLS policy: LDS
	// and CDS files (envoyconfig.LDSFile, CDSFile) on every change of the
	// policy, and the bootstrap (envoyconfig.BootstrapFile) once the first
	// LDS and CDS are in place, so its appearance says Envoy may start. It
	// is created (0755: the files hold no secrets) when missing. Empty
	// leaves Envoy's configuration to someone else, and the policy is not
	// asked for.
	EnvoyConfigDir string
	// Proxy describes the proxy for EnvoyConfigDir: Service (FQDN, inbound
	// listener, local application), Destinations, TrustDomain and NodeID.
	// Its Policy and SDSSocket are ignored: the agent sets the policy it
	// received and SocketPath.
	Proxy envoyconfig.Proxy
	// PolicyWait is how long to wait for the server's first policy before
	// writing a configuration without it; see FallbackPolicy. Zero means
	// DefaultPolicyWait; negative waits as long as it takes (unless the
	// server says it serves no policy).
	PolicyWait time.Duration
	Clock      clockwork.Clock
	Logger     *slog.Logger
	Metrics    prometheus.Registerer
	// Rand returns a uniformly distributed number in [0, 1] for the jitter;
	// nil uses math/rand/v2. Tests pin it. It is called from several
	// goroutines, one at a time.
	Rand func() float64
}

// Agent is the node agent of one proxy.
type Agent struct {
	cfg     Config
	clock   clockwork.Clock
	log     *slog.Logger
	metrics *metrics
	node    string
	bcast   *sds.Broadcaster
	sds     *sds.Server
	enforce *enforcer // nil without EnvoyConfigDir
	running atomic.Bool
	// kick asks the renewal loop to renew now: the trust bundle changed and
	// the current certificate no longer chains to it.
	kick chan struct{}
	// resched wakes the renewal loop to look at its schedule again:
	// rotateAt was set.
	resched chan struct{}

	randMu sync.Mutex
	rand   func() float64

	mu        sync.Mutex
	creds     *caclient.Credentials // the current certificate, nil before the first
	withdrawn bool                  // creds expired and are no longer served
	next      time.Time             // next fetch: renewal or retry
	lastErr   error                 // of the last fetch; nil after a success
	roots     []*x509.Certificate
	rootsGen  uint64    // counts changes of roots, so the fetcher knows to rebuild its client
	pending   []string  // fingerprints of a server bundle not yet answered, awaiting the proxies
	rotateAt  time.Time // renew by then: a new root signs; zero when not set
}

// New validates cfg. It starts nothing; see Run.
func New(cfg Config) (*Agent, error) {
	if cfg.ServerAddr == "" {
		return nil, errors.New("agent: a server address is required")
	}
	if len(cfg.TrustBundle) == 0 {
		return nil, errors.New("agent: a trust bundle is required to authenticate the server")
	}
	for i, c := range cfg.TrustBundle {
		if c == nil {
			return nil, fmt.Errorf("agent: trust bundle entry %d is nil", i)
		}
	}
	if cfg.TokenFile == "" {
		return nil, errors.New("agent: a token file is required")
	}
	if cfg.SocketPath == "" {
		return nil, errors.New("agent: an SDS socket path is required")
	}
	if cfg.KeyType == "" {
		cfg.KeyType = keystore.ECDSAP256
	}
	if _, err := keystore.ParseKeyType(string(cfg.KeyType)); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	if cfg.TTL < 0 {
		return nil, fmt.Errorf("agent: negative TTL %s", cfg.TTL)
	}
	if cfg.RenewAt == 0 {
		cfg.RenewAt = DefaultRenewAt
	}
	switch {
	case cfg.Jitter == 0:
		cfg.Jitter = DefaultJitter
	case cfg.Jitter < 0:
		cfg.Jitter = 0
	}
	if cfg.RenewAt-cfg.Jitter <= 0 || cfg.RenewAt+cfg.Jitter >= 1 {
		return nil, fmt.Errorf("agent: renewal at %g ± %g of the lifetime must fall strictly inside it", cfg.RenewAt, cfg.Jitter)
	}
	if cfg.RetryMin == 0 {
		cfg.RetryMin = DefaultRetryMin
	}
	if cfg.RetryMax == 0 {
		cfg.RetryMax = max(DefaultRetryMax, cfg.RetryMin)
	}
	if cfg.RetryMin < 0 || cfg.RetryMax < cfg.RetryMin {
		return nil, fmt.Errorf("agent: retry backoff %s to %s is not a range", cfg.RetryMin, cfg.RetryMax)
	}
	if cfg.RotationWindow <= 0 {
		cfg.RotationWindow = DefaultRotationWindow
	}
	if cfg.PolicyWait == 0 {
		cfg.PolicyWait = DefaultPolicyWait
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	cfg.TrustBundle = append([]*x509.Certificate(nil), cfg.TrustBundle...)

	b := sds.NewBroadcaster()
	// The socket is reachable only by processes allowed into its 0700
	// directory and 0600 file: the local proxy. Hence no authentication.
	srv, err := sds.New(sds.Config{Source: b, Clock: cfg.Clock, Logger: cfg.Logger, Metrics: cfg.Metrics})
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	node := "meshca-agent"
	if h, err := os.Hostname(); err == nil && h != "" {
		node += "/" + h
	}
	m := newMetrics(cfg.Metrics)
	var enf *enforcer
	if cfg.EnvoyConfigDir != "" {
		if enf, err = newEnforcer(cfg, m); err != nil {
			return nil, err
		}
	}
	return &Agent{
		cfg:     cfg,
		clock:   cfg.Clock,
		log:     cfg.Logger,
		metrics: m,
		node:    node,
		bcast:   b,
		sds:     srv,
		enforce: enf,
		kick:    make(chan struct{}, 1),
		resched: make(chan struct{}, 1),
		rand:    cfg.Rand,
		roots:   cfg.TrustBundle,
	}, nil
}

// Ready reports whether the agent has a valid certificate to serve; the
// error wraps ErrNoCertificate and says why not.
func (a *Agent) Ready() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.creds == nil && a.lastErr != nil:
		return fmt.Errorf("%w: none obtained yet: %w", ErrNoCertificate, a.lastErr)
	case a.creds == nil:
		return fmt.Errorf("%w: none obtained yet", ErrNoCertificate)
	case a.withdrawn || !a.clock.Now().Before(a.creds.NotAfter):
		return fmt.Errorf("%w: it expired at %s without a replacement (last error: %v)",
			ErrNoCertificate, a.creds.NotAfter.UTC().Format(time.RFC3339), a.lastErr)
	}
	return nil
}

// Status is what the agent holds and plans.
type Status struct {
	// ID, Serial (hex) and NotAfter describe the current certificate; zero
	// before the first.
	ID       spiffeid.ID
	Serial   string
	NotAfter time.Time
	// Withdrawn is set once the certificate expired without a replacement
	// and is no longer served.
	Withdrawn bool
	// NextRenewal is when the next request for a certificate is due: the
	// renewal, or the next retry after a failure.
	NextRenewal time.Time
	// LastError is why the last request failed; nil after a success.
	LastError error
	// Roots are the SHA-256 fingerprints (ca.Fingerprint) of the trust
	// bundle served to the proxy and used to trust the server.
	Roots []string
	// PendingBundle are the fingerprints of the trust bundle the server
	// sent last, while the agent holds back its answer until every local
	// proxy watching ROOTCA has answered it; nil otherwise.
	PendingBundle []string
	// PolicySource says where the policy of the Envoy configuration in
	// force came from; empty until one is written, and without
	// EnvoyConfigDir. Policy is that policy and PolicyVersion its version
	// (sds.PolicyVersion); both are zero for PolicyPrevious, whose policy
	// the agent does not know.
	PolicySource  PolicySource
	Policy        *policy.Policy
	PolicyVersion string
	// PolicyError is why the last policy was not applied; nil once one is.
	PolicyError error
}

// Status returns a snapshot of the agent's state.
func (a *Agent) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := Status{Withdrawn: a.withdrawn, NextRenewal: a.next, LastError: a.lastErr,
		PendingBundle: slices.Clone(a.pending)}
	if c := a.creds; c != nil {
		s.ID, s.Serial, s.NotAfter = c.ID, c.Chain[0].SerialNumber.Text(16), c.NotAfter
	}
	s.Roots = fingerprints(a.roots)
	if a.enforce != nil {
		s.Policy, s.PolicyVersion, s.PolicySource, s.PolicyError = a.enforce.state()
	}
	return s
}

// publish hands the proxy what it should have now: the roots always, the
// certificate unless there is none or it was withdrawn. a.mu is held.
func (a *Agent) publish() {
	snap := sds.Snapshot{Roots: a.roots}
	if a.creds != nil && !a.withdrawn {
		snap.Chain, snap.Key = a.creds.Chain, a.creds.Key
	}
	if err := a.bcast.Set(snap); err != nil {
		// caclient verified the pair, so this is a bug, not a bad server.
		a.log.Error("cannot serve the secrets to the proxy", "err", err)
	}
}

// trust returns the current roots and their generation.
func (a *Agent) trust() ([]*x509.Certificate, uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.roots, a.rootsGen
}

// setRoots makes roots the trust bundle and reports whether they changed;
// a change is published and checked against the certificate. a.mu is held.
func (a *Agent) setRoots(roots []*x509.Certificate, source string) bool {
	if slices.EqualFunc(a.roots, roots, (*x509.Certificate).Equal) {
		return false
	}
	a.roots = append([]*x509.Certificate(nil), roots...)
	a.rootsGen++
	a.metrics.bundleUpdates.Inc()
	a.publish()
	a.log.Info("trust bundle changed", "source", source, "roots", fingerprints(roots))
	a.checkChain()
	a.checkSigningRoot()
	return true
}

// checkChain renews at once when the current certificate does not chain to
// the trust bundle: peers holding the bundle would refuse it until the next
// renewal. a.mu is held.
func (a *Agent) checkChain() {
	if a.creds == nil || a.withdrawn || chainsTo(a.creds.Chain, a.roots, a.clock.Now()) {
		return
	}
	a.log.Warn("the current certificate does not chain to the trust bundle; renewing now",
		"serial", a.creds.Chain[0].SerialNumber.Text(16))
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// checkSigningRoot schedules a renewal within the rotation window when the
// bundle's first root, the one that signs (meshca puts it first), is not
// the one the current certificate chains to: a new root was activated, and
// the old one will leave the bundle once no certificate needs it. a.mu is
// held.
func (a *Agent) checkSigningRoot() {
	if a.creds == nil || a.withdrawn || len(a.roots) < 2 || !a.rotateAt.IsZero() ||
		chainsTo(a.creds.Chain, a.roots[:1], a.clock.Now()) {
		return
	}
	a.rotateAt = a.clock.Now().Add(time.Duration(a.random() * float64(a.cfg.RotationWindow)))
	a.log.Info("a new root signs; renewing the certificate early", "at", a.rotateAt,
		"serial", a.creds.Chain[0].SerialNumber.Text(16))
	select {
	case a.resched <- struct{}{}:
	default:
	}
}

func (a *Agent) random() float64 {
	a.randMu.Lock()
	defer a.randMu.Unlock()
	return a.rand()
}

// backoff is the delay before retry number n (from 1).
func (a *Agent) backoff(n int) time.Duration {
	d := a.cfg.RetryMin
	for i := 1; i < n && d < a.cfg.RetryMax; i++ {
		d *= 2
	}
	d = min(d, a.cfg.RetryMax)
	return d - time.Duration(float64(d)*backoffJitter*a.random())
}

// readToken reads the token afresh: the kubelet replaces it well before it
// expires, and a cached copy would eventually be refused.
func (a *Agent) readToken() (string, error) {
	b, err := os.ReadFile(a.cfg.TokenFile)
	if err != nil {
		return "", fmt.Errorf("agent: read token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("agent: token file %s is empty", a.cfg.TokenFile)
	}
	return tok, nil
}

// chainsTo reports whether chain (leaf first) verifies up to one of roots
// at now.
func chainsTo(chain, roots []*x509.Certificate, now time.Time) bool {
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err == nil
}
