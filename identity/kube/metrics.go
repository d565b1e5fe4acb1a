package kube

import "github.com/prometheus/client_golang/prometheus"

// Metrics are shared by the authenticators and indexes of every cluster,
// told apart by a cluster label.
type Metrics struct {
	reviews *prometheus.CounterVec
	cache   *prometheus.CounterVec
	lookups *prometheus.CounterVec
	latency *prometheus.HistogramVec
}

// NewMetrics registers the metrics with reg; a nil reg keeps them
// unregistered.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		reviews: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_tokenreview_requests_total",
			Help: "TokenReview calls made to the API server, by cluster and result (authenticated, refused, error).",
		}, []string{"cluster", "result"}),
		cache: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_tokenreview_cache_total",
			Help: "Token authentications answered from the review cache (hit) or needing a review (miss).",
		}, []string{"cluster", "result"}),
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_binding_lookups_total",
			Help: "Checks that a token's pod or service account still exists, by where the answer came from (informer, api, absent).",
		}, []string{"cluster", "kind", "source"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "meshca_tokenreview_duration_seconds",
			Help:    "Latency of TokenReview calls.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}, []string{"cluster"}),
	}
	if reg != nil {
		reg.MustRegister(m.reviews, m.cache, m.lookups, m.latency)
	}
	return m
}
