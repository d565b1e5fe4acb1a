package leader

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"os"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Elector takes part in an election until its Run's context ends.
type Elector interface {
	// Run campaigns, leads while it can and campaigns again after losing,
	// until ctx ends; then it gives leadership up and returns.
	Run(ctx context.Context) error
	// IsLeader reports whether this replica leads now.
	IsLeader() bool
	// Changed returns a channel that is closed at the next change of
	// IsLeader or Leader; call it again for the change after that.
	Changed() <-chan struct{}
	// Identity names this replica, as it appears as the leader.
	Identity() string
	// Leader is the identity of the leader: this replica's while it
	// leads, otherwise the holder last seen in the lock (which may have
	// lapsed), or "" if none is known.
	Leader() string
}

// state is what both electors report. Every change goes through update, so
// IsLeader, Leader, the metrics and Changed always agree.
type state struct {
	identity string
	log      *slog.Logger
	metrics  *metrics

	mu      sync.Mutex
	leading bool
	holder  string // last holder seen in the lock
	changed chan struct{}
}

func newState(identity string, log *slog.Logger, reg prometheus.Registerer) *state {
	return &state{identity: identity, log: log, metrics: newMetrics(reg), changed: make(chan struct{})}
}

// IsLeader implements Elector.
func (s *state) IsLeader() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leading
}

// Identity implements Elector.
func (s *state) Identity() string { return s.identity }

// Leader implements Elector.
func (s *state) Leader() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leaderLocked()
}

// Changed implements Elector.
func (s *state) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

func (s *state) leaderLocked() string {
	if s.leading {
		return s.identity
	}
	return s.holder
}

// update replaces (leading, holder) with what f returns, under the lock, so
// f's own checks and the change are one step.
func (s *state) update(f func(leading bool, holder string) (bool, string)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	wasLeading, wasLeader := s.leading, s.leaderLocked()
	s.leading, s.holder = f(s.leading, s.holder)
	nowLeader := s.leaderLocked()
	if s.leading == wasLeading && nowLeader == wasLeader {
		return
	}
	switch {
	case s.leading && !wasLeading:
		s.log.Info("became leader", "identity", s.identity)
	case !s.leading && wasLeading:
		s.log.Info("stopped leading", "identity", s.identity)
	}
	if s.leading != wasLeading {
		s.metrics.transition(s.leading)
	}
	if !s.leading && nowLeader != wasLeader && nowLeader != "" && nowLeader != s.identity {
		s.log.Info("leader observed", "leader", nowLeader)
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

// setLeading changes only whether this replica leads.
func (s *state) setLeading(leading bool) {
	s.update(func(_ bool, holder string) (bool, string) { return leading, holder })
}

// stepDown stops leading; this replica is no longer known to hold the
// lock, as another may have it now.
func (s *state) stepDown() {
	s.update(func(_ bool, holder string) (bool, string) {
		if holder == s.identity {
			holder = ""
		}
		return false, holder
	})
}

// observe records the holder seen in the lock.
func (s *state) observe(holder string) {
	s.update(func(leading bool, _ string) (bool, string) { return leading, holder })
}

// defaultIdentity names this process uniquely: the host name (the pod's
// name in a cluster) and a random suffix, so that a restarted process is a
// new candidate rather than the holder of its predecessor's lease.
func defaultIdentity() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "meshca"
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b) // never fails (crypto/rand panics instead)
	return host + "_" + hex.EncodeToString(b)
}

type metrics struct {
	leader      prometheus.Gauge
	transitions prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_leader",
			Help: "1 while this replica leads (drives root rotation and writes the CA journal), 0 otherwise.",
		}),
		transitions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_leader_transitions_total",
			Help: "Times this replica became leader or stopped leading; a steady rise means the election flaps.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.leader, m.transitions)
	}
	return m
}

func (m *metrics) transition(leading bool) {
	m.transitions.Inc()
	if leading {
		m.leader.Set(1)
	} else {
		m.leader.Set(0)
	}
}
