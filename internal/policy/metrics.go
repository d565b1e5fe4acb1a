package policy

import "github.com/prometheus/client_golang/prometheus"

// Metrics describe the policy a store has in force and how edits fare. One
// process runs one store, so there are no labels.
type Metrics struct {
	generation  prometheus.Gauge
	mode        prometheus.Gauge
	excluded    prometheus.Gauge
	valid       prometheus.Gauge
	parseErrors prometheus.Counter
	conflicts   prometheus.Counter
}

// NewMetrics registers the metrics with reg; a nil reg keeps them
// unregistered.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		generation: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_policy_generation",
			Help: "Number of stored policy versions applied since start; it moves on every applied edit.",
		}),
		mode: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_policy_mtls_mode",
			Help: "mTLS mode in force: 0 disabled, 1 permissive, 2 strict.",
		}),
		excluded: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_policy_excluded_services",
			Help: "Number of entries in the policy's excluded services.",
		}),
		valid: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_policy_source_valid",
			Help: "1 when the newest stored policy parsed and is in force, 0 when it is malformed and an older one is kept.",
		}),
		parseErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_policy_parse_errors_total",
			Help: "Stored policy versions that were malformed and not applied.",
		}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_policy_update_conflicts_total",
			Help: "Policy updates that lost a race with another writer and were retried on a fresh read.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.generation, m.mode, m.excluded, m.valid, m.parseErrors, m.conflicts)
	}
	return m
}

// Conflict counts an update retried because another writer got there first.
func (m *Metrics) Conflict() { m.conflicts.Inc() }

func (m *Metrics) applied(p Policy) {
	m.generation.Inc()
	switch {
	case !p.Enabled:
		m.mode.Set(0)
	case p.EffectiveMode() == ModePermissive:
		m.mode.Set(1)
	default:
		m.mode.Set(2)
	}
	m.excluded.Set(float64(len(p.Excluded)))
}
