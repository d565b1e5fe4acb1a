package peers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"

	"github.com/meshca/meshca/internal/rotation"
)

// Defaults of Config.
const (
	DefaultName     = "meshca-replicas"
	DefaultInterval = 5 * time.Second
	DefaultDebounce = time.Second
)

// requestTimeout bounds each API call, so a wedged API server closes the
// gates instead of stalling the publisher.
const requestTimeout = 10 * time.Second

// maxAttempts bounds the read-modify-write rounds of one publication; a
// replica that loses them all tries again at the next turn.
const maxAttempts = 5

// Config configures a Publisher.
type Config struct {
	// Client reaches the API server; the replicas need get, update and
	// create on ConfigMaps in Namespace.
	Client    kubernetes.Interface
	Namespace string
	// Name of the ConfigMap (default DefaultName).
	Name string
	// Identity is this replica's key in the ConfigMap: unique among the
	// replicas, and a valid ConfigMap key. The leader elector's identity
	// is the natural choice.
	Identity string
	// Proxies are this replica's SDS streams (*sds.Server); Ledger its
	// audit ledger.
	Proxies rotation.Proxies
	Ledger  rotation.Ledger
	// Interval is how often the entry is rewritten and the others' are
	// read (default DefaultInterval). The ledger is scanned at this pace.
	Interval time.Duration
	// Debounce is how long after a change of this replica's ACKs the entry
	// is rewritten, so a burst of ACKs makes one write (default
	// DefaultDebounce).
	Debounce time.Duration
	// FreshFor is how long an entry counts as fresh after it was written,
	// and how old the last successful read may be before the view fails
	// (default 3 × Interval). Replicas' clocks must agree to well within it.
	FreshFor time.Duration
	Clock    clockwork.Clock
	Logger   *slog.Logger
	// Metrics registers meshca_peers_* (nil: not registered).
	Metrics prometheus.Registerer
}

// Publisher keeps this replica's entry in the shared ConfigMap current and
// reads the others' into its View.
type Publisher struct {
	cfg     Config
	clock   clockwork.Clock
	log     *slog.Logger
	metrics *metrics
	view    *View
	what    string

	// Run's alone.
	holdings     []rotation.Holding // as last read from the ledger
	haveHoldings bool
	failing      bool // the last publication failed: log the recovery
}

// New validates cfg. It starts nothing and calls nothing.
func New(cfg Config) (*Publisher, error) {
	if cfg.Client == nil || cfg.Namespace == "" || cfg.Proxies == nil || cfg.Ledger == nil {
		return nil, errors.New("peers: a client, a namespace, this replica's SDS streams and its audit ledger are required")
	}
	if errs := validation.IsConfigMapKey(cfg.Identity); len(errs) > 0 {
		return nil, fmt.Errorf("peers: replica identity %q is not a ConfigMap key: %s", cfg.Identity, strings.Join(errs, "; "))
	}
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = DefaultDebounce
	}
	if cfg.FreshFor <= 0 {
		cfg.FreshFor = 3 * cfg.Interval
	}
	if cfg.FreshFor < cfg.Interval {
		return nil, fmt.Errorf("peers: entries fresh for %v would go stale between two writes %v apart", cfg.FreshFor, cfg.Interval)
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	what := "ConfigMap " + cfg.Namespace + "/" + cfg.Name
	cfg.Logger = cfg.Logger.With("configmap", cfg.Namespace+"/"+cfg.Name, "replica", cfg.Identity)
	return &Publisher{
		cfg: cfg, clock: cfg.Clock, log: cfg.Logger, metrics: newMetrics(cfg.Metrics), what: what,
		view: newView(cfg.Proxies, cfg.Ledger, cfg.Clock, what, cfg.FreshFor),
	}, nil
}

// View is the merged view, for rotation.Config's Proxies and Ledger. It
// fails closed until Run has read the ConfigMap.
func (p *Publisher) View() *View { return p.view }

// Run publishes at once, then every Interval and Debounce after each
// change of this replica's ACKs, until ctx ends. Failures are logged,
// counted and retried at the next turn; meanwhile the view fails closed.
func (p *Publisher) Run(ctx context.Context) error {
	nudge := make(chan struct{}, 1)
	var wg sync.WaitGroup
	wg.Go(func() { p.follow(ctx, nudge) })
	defer wg.Wait()

	t := p.clock.NewTicker(p.cfg.Interval)
	defer t.Stop()
	p.sync(ctx, true)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.Chan():
			p.sync(ctx, true)
		case <-nudge:
			select {
			case <-ctx.Done():
				return nil
			case <-p.clock.After(p.cfg.Debounce):
			}
			select {
			case <-nudge: // covered by this write
			default:
			}
			// Only ACKs changed: the ledger's holdings from the last
			// scan serve, and the next tick scans it again.
			p.sync(ctx, false)
		}
	}
}

// follow passes each change of this replica's streams to the view at once
// and nudges Run to publish.
func (p *Publisher) follow(ctx context.Context, nudge chan<- struct{}) {
	changed := p.cfg.Proxies.AckChanged()
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
		// The next change must not slip in before the channel is taken.
		changed = p.cfg.Proxies.AckChanged()
		p.view.localChanged()
		select {
		case nudge <- struct{}{}:
		default:
		}
	}
}

// sync writes this replica's entry, reading the others' on the way; with
// rescan it reads the ledger afresh.
func (p *Publisher) sync(ctx context.Context, rescan bool) {
	err := p.publish(ctx, rescan)
	switch {
	case ctx.Err() != nil:
	case err != nil && !p.failing:
		p.log.Warn("cannot publish this replica's proxies and certificates to the other replicas; retrying every interval", "err", err)
	case err != nil:
		p.log.Debug("publishing to the other replicas still fails", "err", err)
	case p.failing:
		p.log.Info("publishing to the other replicas works again")
	}
	p.failing = err != nil
}

func (p *Publisher) publish(ctx context.Context, rescan bool) error {
	now := p.clock.Now()
	if rescan || !p.haveHoldings {
		hs, err := p.cfg.Ledger.Valid(ctx, now)
		if err != nil {
			// Publishing without them could let another replica retire a
			// root this replica's certificates chain to. Unwritten, the
			// entry goes stale: the streams stop counting, and what it
			// last listed still does.
			p.metrics.writes.WithLabelValues("failed").Inc()
			_, rerr := p.read(ctx)
			return errors.Join(fmt.Errorf("peers: reading this replica's live certificates: %w", err), rerr)
		}
		p.holdings, p.haveHoldings = hs, true
	}
	live := make([]rotation.Holding, 0, len(p.holdings))
	for _, h := range p.holdings {
		if now.Before(h.NotAfter) {
			live = append(live, h)
		}
	}
	data, err := newWire(now, p.cfg.Proxies.Status(), live).encode()
	if err != nil {
		p.metrics.writes.WithLabelValues("failed").Inc()
		return err
	}
	for attempt := 1; ; attempt++ {
		err := p.write(ctx, data, now)
		switch {
		case err == nil:
			p.metrics.writes.WithLabelValues("written").Inc()
			p.metrics.entryBytes.Set(float64(len(data)))
			return nil
		case errors.Is(err, errConflict) && attempt < maxAttempts:
			p.metrics.writes.WithLabelValues("conflict").Inc()
			if attempt == 1 {
				continue // the other write is done: a fresh read usually wins
			}
			// Losing again means the writers are in step (a slow API
			// server, a saturated client): a random pause breaks it.
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-p.clock.After(rand.N(p.cfg.Interval/4 + 1)):
			}
		default:
			p.metrics.writes.WithLabelValues("failed").Inc()
			return err
		}
	}
}

// errConflict marks a write that lost to another replica's.
var errConflict = errors.New("peers: another replica wrote first")

// write is one read-modify-write of the ConfigMap: this replica's key set
// to data, entries nothing is left of removed, every other key kept, and
// the update conditional on the version read.
func (p *Publisher) write(ctx context.Context, data []byte, now time.Time) error {
	cur, err := p.read(ctx)
	if err != nil {
		return err
	}
	var next *corev1.ConfigMap
	if cur == nil {
		next = &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: p.cfg.Namespace, Name: p.cfg.Name}}
	} else {
		next = cur.DeepCopy()
	}
	if next.BinaryData == nil {
		next.BinaryData = map[string][]byte{}
	}
	next.BinaryData[p.cfg.Identity] = data
	removed := p.view.removable(now)
	for _, id := range removed {
		delete(next.BinaryData, id)
	}
	if next.Labels == nil {
		next.Labels = map[string]string{}
	}
	for k, v := range labels() {
		next.Labels[k] = v
	}
	size := 0
	for _, v := range next.Data {
		size += len(v)
	}
	for _, v := range next.BinaryData {
		size += len(v)
	}
	if size > corev1.MaxSecretSize {
		return fmt.Errorf("peers: %s would hold %d bytes, over the API server's limit of %d; this replica's entry is %d bytes",
			p.what, size, corev1.MaxSecretSize, len(data))
	}

	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	if cur == nil {
		_, err = p.configMaps().Create(rctx, next, metav1.CreateOptions{})
	} else {
		_, err = p.configMaps().Update(rctx, next, metav1.UpdateOptions{})
	}
	switch {
	case apierrors.IsConflict(err), apierrors.IsAlreadyExists(err):
		return fmt.Errorf("%w: %w", errConflict, err)
	case err != nil:
		return fmt.Errorf("peers: writing %s: %w", p.what, err)
	}
	p.metrics.objectBytes.Set(float64(size))
	for _, id := range removed {
		p.log.Info("removed a stale replica's entry: its streams are gone and its certificates expired", "stale", id)
	}
	return nil
}

// read gets the ConfigMap (nil when it does not exist) and passes the
// other replicas' entries to the view, or the failure.
func (p *Publisher) read(ctx context.Context) (*corev1.ConfigMap, error) {
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	cm, err := p.configMaps().Get(rctx, p.cfg.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		cm, err = nil, nil
	case err != nil:
		p.view.readFailed(err)
		p.metrics.readFailing.Set(1)
		return nil, fmt.Errorf("peers: reading %s: %w", p.what, err)
	}
	var entries map[string][]byte
	if cm != nil {
		entries = cm.BinaryData
	}
	now := p.clock.Now()
	p.view.observe(p.cfg.Identity, entries, now)
	p.metrics.readFailing.Set(0)
	fresh, stale, unreadable := p.view.counts(now)
	p.metrics.replicas.WithLabelValues("fresh").Set(float64(fresh))
	p.metrics.replicas.WithLabelValues("stale").Set(float64(stale))
	p.metrics.replicas.WithLabelValues("unreadable").Set(float64(unreadable))
	return cm, nil
}

func (p *Publisher) configMaps() typedcorev1.ConfigMapInterface {
	return p.cfg.Client.CoreV1().ConfigMaps(p.cfg.Namespace)
}

// labels mark the ConfigMap as meshca's, for kubectl and backups.
func labels() map[string]string {
	return map[string]string{
		"app.kubernetes.io/name":      "meshca",
		"app.kubernetes.io/component": "replicas",
	}
}
