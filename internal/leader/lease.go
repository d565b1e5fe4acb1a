package leader

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"
)

// Defaults of LeaseConfig, those of Kubernetes' own controllers: a
// leader that cannot renew gives up within RenewDeadline (plus one
// RetryPeriod), before the others may take over after LeaseDuration.
const (
	DefaultLeaseDuration = 15 * time.Second
	DefaultRenewDeadline = 10 * time.Second
	DefaultRetryPeriod   = 2 * time.Second
)

// CheckTimings refuses lease timings the election cannot keep. NewLease
// applies it; a caller that takes the timings from its user can apply it
// first, to name its own settings in the error.
func CheckTimings(leaseDuration, renewDeadline, retryPeriod time.Duration) error {
	switch {
	case leaseDuration <= 0 || renewDeadline <= 0 || retryPeriod <= 0:
		return fmt.Errorf("leader: lease duration %v, renew deadline %v and retry period %v must all be positive", leaseDuration, renewDeadline, retryPeriod)
	case leaseDuration < time.Second:
		return fmt.Errorf("leader: lease duration %v is under the Lease's resolution of 1s", leaseDuration)
	case leaseDuration%time.Second != 0:
		// The other candidates go by what the Lease keeps: a fraction
		// would be cut off the lease they wait out, under what the
		// check below allowed.
		return fmt.Errorf("leader: lease duration %v is not a whole number of seconds, which the Lease records", leaseDuration)
	case float64(renewDeadline) <= leaderelection.JitterFactor*float64(retryPeriod):
		return fmt.Errorf("leader: renew deadline %v must be longer than %g × retry period %v, so that a leader gets to retry a failed renewal before it gives up",
			renewDeadline, leaderelection.JitterFactor, retryPeriod)
	}
	if least := minLeaseDuration(renewDeadline, retryPeriod); leaseDuration <= least {
		extra := ""
		if d := least - renewDeadline - retryPeriod; d > 0 {
			extra = fmt.Sprintf(" and %v (renewals under a second apart can look like no change to the others, who compare the Lease in whole seconds)", d)
		}
		return fmt.Errorf("leader: lease duration %v must be longer than %v, renew deadline %v plus retry period %v%s: a leader cut off from the API server has to stop leading before another replica may take over",
			leaseDuration, least, renewDeadline, retryPeriod, extra)
	}
	return nil
}

// minLeaseDuration is what a lease duration must be longer than, with
// renewDeadline and retryPeriod, for a leader to stop leading before
// another may start.
//
// A leader cut off from the API server leads on until the renewal it began
// a retryPeriod after its last success has failed for renewDeadline. The
// others take over a lease duration after they saw that success, and may
// have seen it up to a second early: client-go tells Lease records apart
// by their times in whole seconds, so a renewal less than a second after
// the one before looks like no change. Retry periods under a second
// therefore cost a second of the lease.
func minLeaseDuration(renewDeadline, retryPeriod time.Duration) time.Duration {
	least := renewDeadline + retryPeriod
	if retryPeriod < time.Second {
		least += time.Second
	}
	return least
}

// LeaseConfig configures a Lease elector.
type LeaseConfig struct {
	// Client reaches the API server. The election's requests share its
	// rate limiter: one that other work can saturate delays renewals, so
	// give the election a client of its own under heavy load.
	Client kubernetes.Interface
	// Namespace and Name of the coordination.k8s.io Lease. The replicas
	// need get, create and update on it.
	Namespace, Name string
	// Identity names this candidate in the Lease (default: the host name,
	// which is the pod's name, and a random suffix). It must differ
	// between replicas.
	Identity string
	// LeaseDuration, RenewDeadline and RetryPeriod default to
	// DefaultLeaseDuration, DefaultRenewDeadline and DefaultRetryPeriod.
	// They must pass CheckTimings: the Lease stores whole seconds, and a
	// leader must give up before the others may take over.
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	Logger                                    *slog.Logger
	// Metrics registers meshca_leader and meshca_leader_transitions_total
	// (nil: not registered).
	Metrics prometheus.Registerer
}

// Lease is an Elector on a Kubernetes Lease, through client-go's leader
// election. Cancelling Run's context releases the Lease, so a clean
// shutdown hands over at once instead of after LeaseDuration.
type Lease struct {
	*state
	election leaderelection.LeaderElectionConfig
	lock     *observedLock
	klog     logr.Logger
}

var _ Elector = (*Lease)(nil)

// NewLease validates cfg; Run starts campaigning.
func NewLease(cfg LeaseConfig) (*Lease, error) {
	if cfg.Client == nil || cfg.Namespace == "" || cfg.Name == "" {
		return nil, fmt.Errorf("leader: a client, a namespace and a name are required")
	}
	if cfg.Identity == "" {
		cfg.Identity = defaultIdentity()
	}
	if cfg.LeaseDuration == 0 {
		cfg.LeaseDuration = DefaultLeaseDuration
	}
	if cfg.RenewDeadline == 0 {
		cfg.RenewDeadline = DefaultRenewDeadline
	}
	if cfg.RetryPeriod == 0 {
		cfg.RetryPeriod = DefaultRetryPeriod
	}
	if err := CheckTimings(cfg.LeaseDuration, cfg.RenewDeadline, cfg.RetryPeriod); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.Logger = cfg.Logger.With("lease", cfg.Namespace+"/"+cfg.Name)
	l := &Lease{
		state: newState(cfg.Identity, cfg.Logger, cfg.Metrics),
		// client-go logs through klog; send it to the same place.
		klog: logr.FromSlogHandler(cfg.Logger.Handler()),
	}
	l.lock = &observedLock{
		Interface: &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Namespace: cfg.Namespace, Name: cfg.Name},
			Client:     cfg.Client.CoordinationV1(),
			LockConfig: resourcelock.ResourceLockConfig{Identity: cfg.Identity},
			Labels: map[string]string{
				"app.kubernetes.io/name":      "meshca",
				"app.kubernetes.io/component": "leader-election",
			},
		},
		state: l.state,
	}
	l.election = leaderelection.LeaderElectionConfig{
		Lock:          l.lock,
		LeaseDuration: cfg.LeaseDuration,
		RenewDeadline: cfg.RenewDeadline,
		RetryPeriod:   cfg.RetryPeriod,
		// Not ReleaseOnCancel: client-go releases after a failed renewal
		// too, before OnStoppedLeading, and while the API server is out
		// of reach that holds OnStoppedLeading back for up to
		// RenewDeadline, long enough for another replica to take over
		// first. Run releases instead, once this replica has stopped.
		Name: cfg.Namespace + "/" + cfg.Name,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: l.started,
			OnStoppedLeading: l.stepDown,
		},
	}
	// Checks the durations against each other; starts nothing.
	if _, err := leaderelection.NewLeaderElector(l.election); err != nil {
		return nil, fmt.Errorf("leader: %w", err)
	}
	return l, nil
}

// Run implements Elector. client-go's elector returns when it loses the
// Lease; Run starts a fresh one, so a replica that lost the Lease during an
// API server outage stands again once the server is back. When ctx ends,
// Run releases the Lease if this replica still holds it, so that another
// can take over at once rather than after LeaseDuration.
func (l *Lease) Run(ctx context.Context) error {
	ctx = klog.NewContext(ctx, l.klog)
	for ctx.Err() == nil {
		le, err := leaderelection.NewLeaderElector(l.election)
		if err != nil {
			return fmt.Errorf("leader: %w", err)
		}
		// Returns after OnStoppedLeading, so this replica does not lead
		// between terms.
		le.Run(ctx)
	}
	l.release()
	return nil
}

// release gives up the Lease if it names this replica, as client-go's own
// release does: the holder is cleared and the duration cut to 1s, which
// other candidates take as free. The write is conditional on the version
// just read, so it cannot clear another replica's claim.
func (l *Lease) release() {
	ctx, cancel := context.WithTimeout(context.Background(), l.election.RenewDeadline)
	defer cancel()
	rec, _, err := l.lock.Get(ctx)
	if err != nil {
		l.log.Warn("could not release the lease; another replica takes over when it lapses", "error", err)
		return
	}
	if rec.HolderIdentity != l.identity {
		return
	}
	now := metav1.NewTime(time.Now())
	err = l.lock.Update(ctx, resourcelock.LeaderElectionRecord{
		LeaseDurationSeconds: 1,
		AcquireTime:          now,
		RenewTime:            now,
		LeaderTransitions:    rec.LeaderTransitions,
	})
	if err != nil {
		l.log.Warn("could not release the lease; another replica takes over when it lapses", "error", err)
		return
	}
	l.log.Info("released the lease")
}

// started runs on a goroutine of its own, which may be scheduled after the
// term it announces has ended: it takes leadership only if the term's
// context is still live, checked under the state's lock. stepDown, the
// OnStoppedLeading callback, runs after that context is cancelled, so it
// cannot be overtaken.
func (l *Lease) started(ctx context.Context) {
	l.update(func(leading bool, holder string) (bool, string) {
		if ctx.Err() != nil {
			return leading, holder
		}
		return true, holder
	})
}

// observedLock reports what the election reads and writes to the state.
// client-go writes only this replica's identity (it would clear it only
// with ReleaseOnCancel, which Lease does not set); the one write naming
// no holder is Lease.release's, after client-go's Run has returned and so
// after stepDown. No write therefore needs to stop this replica leading
// first.
type observedLock struct {
	resourcelock.Interface
	state *state
}

func (o *observedLock) Get(ctx context.Context) (*resourcelock.LeaderElectionRecord, []byte, error) {
	rec, raw, err := o.Interface.Get(ctx)
	if err == nil {
		o.state.observe(rec.HolderIdentity)
	}
	return rec, raw, err
}

func (o *observedLock) Create(ctx context.Context, rec resourcelock.LeaderElectionRecord) error {
	err := o.Interface.Create(ctx, rec)
	if err == nil {
		o.state.observe(rec.HolderIdentity)
	}
	return err
}

func (o *observedLock) Update(ctx context.Context, rec resourcelock.LeaderElectionRecord) error {
	err := o.Interface.Update(ctx, rec)
	if err == nil {
		o.state.observe(rec.HolderIdentity)
	}
	return err
}
