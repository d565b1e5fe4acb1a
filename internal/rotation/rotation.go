// Package rotation drives root CA rotation: it decides when each step of
// ca.Authority's rotation (prepare, activate, retire) is safe, from what the
// proxies have acknowledged over SDS and what the audit ledger knows is
// still valid, and runs the steps on an optional schedule.
//
// The rules:
//
//   - prepare is always allowed from idle: the new root only joins the
//     trust bundle.
//   - activate needs the proxies to trust the new root first: every
//     connected ROOTCA stream must have ACKed a bundle containing it, and
//     every identity that holds a live certificate but has no stream counts
//     as a proxy that has not (it would reject peers signed by the new
//     root). MinAcked lowers the bar to a fraction; Force skips it.
//   - retire needs no live leaf left under the retiring roots, by the
//     ledger; the retiring intermediates' keys were destroyed at
//     activation, so nothing new can appear under them. Force skips it.
package rotation

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/sds"
)

// CA is the part of *ca.Authority rotation drives.
type CA interface {
	Rotation() (ca.Rotation, error)
	Rotate(ctx context.Context, step ca.Step) (ca.Rotation, error)
}

// Proxies reports what the connected proxies have ACKed: *sds.Server.
type Proxies interface {
	Status() []sds.StreamStatus
	AckChanged() <-chan struct{}
}

// Holding is a certificate the ledger knows is valid.
type Holding struct {
	SPIFFEID        string
	RootFingerprint string
	NotAfter        time.Time
}

// Ledger lists the certificates valid at a time: the audit ledger.
type Ledger interface {
	Valid(ctx context.Context, at time.Time) ([]Holding, error)
}

// LedgerFunc adapts a function to Ledger.
type LedgerFunc func(ctx context.Context, at time.Time) ([]Holding, error)

// Valid calls f.
func (f LedgerFunc) Valid(ctx context.Context, at time.Time) ([]Holding, error) { return f(ctx, at) }

// ErrBlocked reports a step whose conditions do not hold; the message says
// which and what would lift them.
var ErrBlocked = errors.New("rotation: blocked")

// ErrNotLeader refuses a step on a replica that does not lead: one
// replica drives rotation, the others follow the journal it writes.
var ErrNotLeader = errors.New("rotation: not the leader")

// Leadership says whether this replica leads (leader.Elector has it).
type Leadership interface {
	IsLeader() bool
	// Leader names the replica that leads, if known.
	Leader() string
}

// Schedule is the automatic rotation of the root.
type Schedule struct {
	// Enabled turns the schedule on (default off: root rotation is an
	// operator's decision unless asked otherwise).
	Enabled bool
	// PrepareAt and ActivateAt are fractions of the current root's
	// lifetime (defaults ½ and ⅚).
	PrepareAt, ActivateAt float64
}

// Config configures a Rotator.
type Config struct {
	CA      CA
	Proxies Proxies
	// Ledger is required: without it retire cannot know what is live.
	Ledger Ledger
	// MinAcked is the default share of proxies that must have ACKed the
	// new root before activate (default 1: all of them).
	MinAcked float64
	Schedule Schedule
	// Interval is how often Run checks the schedule (default 10s).
	Interval time.Duration
	// Leader, when set, confines steps and the schedule to the leader;
	// nil means this process is the only one.
	Leader  Leadership
	Clock   clockwork.Clock
	Logger  *slog.Logger
	Metrics prometheus.Registerer
}

// Options qualify one step.
type Options struct {
	// MinAcked overrides Config.MinAcked for activate when in (0, 1].
	MinAcked float64
	// Force performs the step although its conditions do not hold.
	Force bool
}

// Rotator runs root rotation steps behind their gates.
type Rotator struct {
	cfg     Config
	clock   clockwork.Clock
	log     *slog.Logger
	metrics *metrics

	// mu serialises steps: two admins must not both pass a gate and then
	// both step.
	mu sync.Mutex
}

// New validates cfg. It starts nothing.
func New(cfg Config) (*Rotator, error) {
	if cfg.CA == nil || cfg.Proxies == nil || cfg.Ledger == nil {
		return nil, errors.New("rotation: a CA, the SDS server's ACK accounting and the audit ledger are required")
	}
	if cfg.MinAcked == 0 {
		cfg.MinAcked = 1
	}
	if cfg.MinAcked < 0 || cfg.MinAcked > 1 {
		return nil, fmt.Errorf("rotation: MinAcked %g is not a fraction in (0, 1]", cfg.MinAcked)
	}
	if cfg.Schedule.PrepareAt == 0 {
		cfg.Schedule.PrepareAt = 0.5
	}
	if cfg.Schedule.ActivateAt == 0 {
		cfg.Schedule.ActivateAt = 5.0 / 6
	}
	if p, a := cfg.Schedule.PrepareAt, cfg.Schedule.ActivateAt; p <= 0 || a <= p || a >= 1 {
		return nil, fmt.Errorf("rotation: schedule wants 0 < prepare (%g) < activate (%g) < 1", p, a)
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 10 * time.Second
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Rotator{cfg: cfg, clock: cfg.Clock, log: cfg.Logger, metrics: newMetrics(cfg.Metrics)}, nil
}

// Slots of a root in Status.
const (
	SlotCurrent  = "current"
	SlotNext     = "next"
	SlotRetiring = "retiring"
)

// Root is one root of the trust bundle.
type Root struct {
	Fingerprint         string    `json:"fingerprint"`
	Subject             string    `json:"subject"`
	Slot                string    `json:"slot"`
	NotBefore           time.Time `json:"notBefore"`
	NotAfter            time.Time `json:"notAfter"`
	AckedProxies        int       `json:"ackedProxies"`
	LiveLeaves          int       `json:"liveLeaves"`
	LiveLeavesExpireBy  time.Time `json:"liveLeavesExpireBy,omitzero"`
	SignsIntermediateOf string    `json:"signingIntermediate,omitempty"`
}

// States of a Proxy that activate waits on.
const (
	StatePending      = "pending"      // connected, not ACKed yet
	StateRejected     = "rejected"     // NACKed; Proxy.Error says why
	StateDisconnected = "disconnected" // holds a live certificate, no SDS stream
)

// Proxy is a proxy that has not ACKed the root a step waits on.
type Proxy struct {
	Identity string `json:"identity"`
	Node     string `json:"node,omitempty"`
	// State is StatePending, StateRejected or StateDisconnected.
	State string `json:"state"`
	Error string `json:"error,omitempty"`
}

// Status is the state of the rotation and what the next step waits on.
type Status struct {
	Phase       ca.Phase  `json:"phase"`
	Roots       []Root    `json:"roots"`
	PreparedAt  time.Time `json:"preparedAt,omitzero"`
	ActivatedAt time.Time `json:"activatedAt,omitzero"`
	// Proxies counts connected ROOTCA streams.
	Proxies int `json:"connectedProxies"`
	// Leader is the replica that drives rotation, when there are several.
	Leader string `json:"leader,omitempty"`
	// NextStep is the step the rotation is waiting for ("" when idle).
	NextStep ca.Step `json:"nextStep,omitempty"`
	// Blockers say why NextStep is not allowed yet; empty when it is.
	Blockers []string `json:"blockers,omitempty"`
	// Missing lists the proxies activate is waiting on.
	Missing []Proxy `json:"missing,omitempty"`
	// Warnings are set by forced steps.
	Warnings []string `json:"warnings,omitempty"`
	// At is the time the status describes.
	At time.Time `json:"at"`
}

// AuditDetail is what a step adds to its audit record: the warnings of a
// forced step.
func (s Status) AuditDetail() string {
	if len(s.Warnings) == 0 {
		return ""
	}
	return "WARNING: " + strings.Join(s.Warnings, "; ")
}

// Status reports the rotation's state and gates.
func (r *Rotator) Status(ctx context.Context) (Status, error) {
	rot, err := r.cfg.CA.Rotation()
	if err != nil {
		return Status{}, err
	}
	now := r.clock.Now()
	holdings, err := r.valid(ctx, now)
	if err != nil {
		return Status{}, err
	}
	return r.status(rot, holdings, r.cfg.MinAcked, now), nil
}

// valid reads the certificates valid now from the ledger: a scan of it,
// so each request reads it once.
func (r *Rotator) valid(ctx context.Context, now time.Time) ([]Holding, error) {
	holdings, err := r.cfg.Ledger.Valid(ctx, now)
	if err != nil {
		return nil, fmt.Errorf("rotation: reading live certificates: %w", err)
	}
	return holdings, nil
}

func (r *Rotator) status(rot ca.Rotation, holdings []Holding, minAcked float64, now time.Time) Status {
	streams := rootStreams(r.cfg.Proxies.Status())
	st := Status{Phase: rot.Phase, PreparedAt: rot.PreparedAt, ActivatedAt: rot.ActivatedAt, Proxies: len(streams), At: now}
	if r.cfg.Leader != nil {
		st.Leader = r.cfg.Leader.Leader()
	}

	live := map[string]int{}
	expireBy := map[string]time.Time{}
	for _, h := range holdings {
		live[h.RootFingerprint]++
		if h.NotAfter.After(expireBy[h.RootFingerprint]) {
			expireBy[h.RootFingerprint] = h.NotAfter
		}
	}
	add := func(c *x509.Certificate, slot string) {
		fp := ca.Fingerprint(c)
		root := Root{Fingerprint: fp, Subject: c.Subject.String(), Slot: slot, NotBefore: c.NotBefore, NotAfter: c.NotAfter,
			LiveLeaves: live[fp], LiveLeavesExpireBy: expireBy[fp]}
		for _, s := range streams {
			if slices.Contains(s.AckedRoots, fp) {
				root.AckedProxies++
			}
		}
		if slot == SlotCurrent && rot.Intermediate != nil {
			root.SignsIntermediateOf = ca.Fingerprint(rot.Intermediate)
		}
		st.Roots = append(st.Roots, root)
	}
	add(rot.Current, SlotCurrent)
	if rot.Next != nil {
		add(rot.Next, SlotNext)
	}
	for _, c := range rot.Retiring {
		add(c, SlotRetiring)
	}

	switch rot.Phase {
	case ca.PhasePrepared:
		st.NextStep = ca.StepActivate
		st.Missing = missing(streams, holdings, ca.Fingerprint(rot.Next))
		by := countStates(st.Missing)
		need := len(streams) + by[StateDisconnected]
		acked := need - len(st.Missing)
		if need > 0 && float64(acked) < math.Ceil(minAcked*float64(need)-1e-9) {
			st.Blockers = append(st.Blockers, activateBlocker(acked, need, minAcked, len(st.Missing), by))
		}
	case ca.PhaseActivated:
		st.NextStep = ca.StepRetire
		for _, c := range rot.Retiring {
			fp := ca.Fingerprint(c)
			if n := live[fp]; n > 0 {
				st.Blockers = append(st.Blockers, fmt.Sprintf("%d live certificate(s) still chain to retiring root %s; the last expires at %s (in %s)",
					n, short(fp), expireBy[fp].UTC().Format(time.RFC3339), expireBy[fp].Sub(now).Round(time.Second)))
			}
		}
	}
	return st
}

// rootStreams keeps the streams subscribed to the trust bundle.
func rootStreams(all []sds.StreamStatus) []sds.StreamStatus {
	out := all[:0:0]
	for _, s := range all {
		if slices.Contains(s.Subscribed, sds.RootsName) {
			out = append(out, s)
		}
	}
	return out
}

// missing lists the proxies that have not ACKed root fp: connected streams
// without it, and identities with live certificates but no stream at all.
func missing(streams []sds.StreamStatus, holdings []Holding, fp string) []Proxy {
	var out []Proxy
	connected := map[string]bool{}
	for _, s := range streams {
		id := s.Peer.ID.String()
		connected[id] = true
		if slices.Contains(s.AckedRoots, fp) {
			continue
		}
		p := Proxy{Identity: id, Node: s.Peer.Node, State: StatePending}
		if slices.Contains(s.RejectedRoots, fp) {
			p.State, p.Error = StateRejected, s.LastNACK
		}
		out = append(out, p)
	}
	seen := map[string]bool{}
	for _, h := range holdings {
		if h.SPIFFEID == "" || connected[h.SPIFFEID] || seen[h.SPIFFEID] {
			continue
		}
		seen[h.SPIFFEID] = true
		out = append(out, Proxy{Identity: h.SPIFFEID, State: StateDisconnected})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Identity < out[j].Identity })
	return out
}

// countStates counts proxies by state.
func countStates(ps []Proxy) map[string]int {
	n := map[string]int{}
	for _, p := range ps {
		n[p.State]++
	}
	return n
}

func activateBlocker(acked, need int, minAcked float64, missing int, by map[string]int) string {
	var parts []string
	if n := by[StatePending]; n > 0 {
		parts = append(parts, fmt.Sprintf("%d connected but not ACKed yet", n))
	}
	if n := by[StateRejected]; n > 0 {
		parts = append(parts, fmt.Sprintf("%d rejected it (NACK)", n))
	}
	if n := by[StateDisconnected]; n > 0 {
		parts = append(parts, fmt.Sprintf("%d hold a live certificate but have no SDS stream", n))
	}
	return fmt.Sprintf("%d of %d proxies have ACKed a trust bundle with the new root (%.0f%% required); %d missing: %s",
		acked, need, 100*minAcked, missing, strings.Join(parts, ", "))
}

func short(fp string) string {
	if len(fp) > 16 {
		return fp[:16] + "…"
	}
	return fp
}

// Step performs one rotation step if its gate allows, or with opts.Force
// regardless, and returns the status after it.
func (r *Rotator) Step(ctx context.Context, step ca.Step, opts Options) (Status, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.leads(); err != nil {
		return Status{}, err
	}
	rot, err := r.cfg.CA.Rotation()
	if err != nil {
		return Status{}, err
	}
	minAcked := r.cfg.MinAcked
	if opts.MinAcked > 0 && opts.MinAcked <= 1 {
		minAcked = opts.MinAcked
	} else if opts.MinAcked != 0 {
		return Status{}, fmt.Errorf("rotation: --min-acked %g is not a fraction in (0, 1]", opts.MinAcked)
	}
	now := r.clock.Now()
	// A step issues no certificate: the holdings serve both statuses.
	holdings, err := r.valid(ctx, now)
	if err != nil {
		return Status{}, err
	}
	before := r.status(rot, holdings, minAcked, now)
	var warnings []string
	if step == before.NextStep && len(before.Blockers) > 0 {
		if !opts.Force {
			r.metrics.refused.WithLabelValues(string(step)).Inc()
			return before, fmt.Errorf("%w: %s refused: %s", ErrBlocked, step, strings.Join(before.Blockers, "; "))
		}
		for _, b := range before.Blockers {
			w := fmt.Sprintf("%s forced although: %s", step, b)
			warnings = append(warnings, w)
			r.log.Warn("Root rotation step forced past its safety check", "step", step, "blocker", b)
		}
	}
	rot, err = r.cfg.CA.Rotate(ctx, step)
	if err != nil {
		return before, err
	}
	r.metrics.steps.WithLabelValues(string(step), fmt.Sprint(len(warnings) > 0)).Inc()
	after := r.status(rot, holdings, r.cfg.MinAcked, r.clock.Now())
	after.Warnings = warnings
	return after, nil
}

// Run drives the automatic schedule, when enabled, until ctx ends: prepare
// at Schedule.PrepareAt of the current root's lifetime, activate at
// Schedule.ActivateAt once the proxies allow it, retire as soon as nothing
// live is left under the old root. Failures are logged and retried on the
// next check; gates are never forced.
func (r *Rotator) Run(ctx context.Context) error {
	if !r.cfg.Schedule.Enabled {
		<-ctx.Done()
		return nil
	}
	t := r.clock.NewTicker(r.cfg.Interval)
	defer t.Stop()
	for {
		acks := r.cfg.Proxies.AckChanged()
		stepped, err := r.tick(ctx)
		if err != nil && !errors.Is(err, ErrBlocked) {
			r.log.Error("Scheduled root rotation step failed; retrying later", "err", err)
		}
		if stepped {
			continue // the next step may be due at once
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.Chan():
		case <-acks:
			// ACKs come in bursts, one per proxy; a status reads the
			// ledger, so look at most once a second.
			select {
			case <-ctx.Done():
				return nil
			case <-r.clock.After(time.Second):
			}
		}
	}
}

// Due returns the step the schedule calls for at now, if any.
func (r *Rotator) Due(rot ca.Rotation, now time.Time) (ca.Step, bool) {
	life := rot.Current.NotAfter.Sub(rot.Current.NotBefore)
	at := func(f float64) time.Time { return rot.Current.NotBefore.Add(time.Duration(f * float64(life))) }
	switch rot.Phase {
	case ca.PhaseIdle:
		return ca.StepPrepare, !now.Before(at(r.cfg.Schedule.PrepareAt))
	case ca.PhasePrepared:
		return ca.StepActivate, !now.Before(at(r.cfg.Schedule.ActivateAt))
	case ca.PhaseActivated:
		return ca.StepRetire, true
	}
	return "", false
}

// leads refuses when another replica leads.
func (r *Rotator) leads() error {
	if r.cfg.Leader == nil || r.cfg.Leader.IsLeader() {
		return nil
	}
	if l := r.cfg.Leader.Leader(); l != "" {
		return fmt.Errorf("%w: %s leads; run the step there", ErrNotLeader, l)
	}
	return fmt.Errorf("%w: no replica leads yet; retry shortly", ErrNotLeader)
}

func (r *Rotator) tick(ctx context.Context) (bool, error) {
	if r.cfg.Leader != nil && !r.cfg.Leader.IsLeader() {
		return false, nil
	}
	rot, err := r.cfg.CA.Rotation()
	if err != nil {
		return false, err
	}
	step, due := r.Due(rot, r.clock.Now())
	if !due {
		return false, nil
	}
	if _, err = r.Step(ctx, step, Options{}); err != nil {
		return false, err
	}
	r.log.Info("Scheduled root rotation step done", "step", step)
	return true, nil
}
