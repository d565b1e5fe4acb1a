package rotation

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	steps   *prometheus.CounterVec
	refused *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		steps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_root_rotation_steps_total",
			Help: "Root rotation steps taken through the rotation gates, by step and whether they were forced past a gate.",
		}, []string{"step", "forced"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_root_rotation_refused_total",
			Help: "Root rotation steps refused by their gate (proxies not ACKed, live leaves left), by step.",
		}, []string{"step"}),
	}
	if reg != nil {
		reg.MustRegister(m.steps, m.refused)
	}
	return m
}
