package agent

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	renewals       *prometheus.CounterVec
	expiry         prometheus.Gauge
	bundleUpdates  prometheus.Counter
	policyApplied  *prometheus.GaugeVec
	policyFailures *prometheus.CounterVec
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
		policyApplied: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshca_agent_policy_applied_info",
			Help: "1 for the mTLS policy the proxy's Envoy configuration was last written with: its version " +
				"(as the server's meshca_sds_policy_acked_streams names it; empty when unknown), where it came from " +
				"(server, fallback, previous) and the mode it gives the local service's inbound listener.",
		}, []string{"version", "source", "inbound_mode"}),
		policyFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_agent_policy_render_failures_total",
			Help: "mTLS policies not applied to the Envoy configuration, by stage (parse, render, write); " +
				"the last good configuration stays in force.",
		}, []string{"stage"}),
	}
	for _, r := range []string{"success", "failure"} {
		m.renewals.WithLabelValues(r)
	}
	for _, s := range []string{"parse", "render", "write"} {
		m.policyFailures.WithLabelValues(s)
	}
	if reg != nil {
		reg.MustRegister(m.renewals, m.expiry, m.bundleUpdates, m.policyApplied, m.policyFailures)
	}
	return m
}
