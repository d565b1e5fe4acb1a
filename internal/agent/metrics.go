package agent

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	renewals      *prometheus.CounterVec
	expiry        prometheus.Gauge
	bundleUpdates prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_agent_renewals_total",
			Help: "Requests for the workload certificate, the first one included, by result (success, failure).",
		}, []string{"result"}),
		expiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_agent_certificate_expiry_timestamp_seconds",
			Help: "When the served workload certificate (or an intermediate in its chain) expires, in Unix seconds.",
		}),
		bundleUpdates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_agent_bundle_updates_total",
			Help: "Changes of the trust bundle served to the proxy and used to trust the server.",
		}),
	}
	for _, r := range []string{"success", "failure"} {
		m.renewals.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(m.renewals, m.expiry, m.bundleUpdates)
	}
	return m
}
