package vault

import "github.com/prometheus/client_golang/prometheus"

// Metrics describe the store's traffic with Vault. One process runs one
// store, so only results and login methods are labels.
type Metrics struct {
	signs       *prometheus.CounterVec
	signLatency prometheus.Histogram
	logins      *prometheus.CounterVec
	renewals    prometheus.Counter
}

// NewMetrics registers the metrics with reg; a nil reg keeps them
// unregistered.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		signs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_vault_sign_requests_total",
			Help: "Signatures asked of Vault Transit, by result (ok, error). A signature that fails local verification counts as an error.",
		}, []string{"result"}),
		signLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshca_vault_sign_duration_seconds",
			Help:    "Latency of Vault Transit sign requests, failures included.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		logins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_vault_logins_total",
			Help: "Logins to Vault, by auth method (approle, kubernetes) and result (ok, error).",
		}, []string{"method", "result"}),
		renewals: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_vault_token_renewals_total",
			Help: "Successful renewals of the store's Vault token.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.signs, m.signLatency, m.logins, m.renewals)
	}
	return m
}
