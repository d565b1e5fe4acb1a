package certservice

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_certificate_requests_total",
			Help: "CreateCertificate requests by result (issued, denied) and denial reason.",
		}, []string{"result", "reason"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "meshca_certificate_request_duration_seconds",
			Help:    "CreateCertificate handling time, authentication included.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 16),
		}, []string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.duration)
	}
	return m
}

func (m *metrics) observe(result, reason string, began time.Time) {
	m.requests.WithLabelValues(result, reason).Inc()
	m.duration.WithLabelValues(result).Observe(time.Since(began).Seconds())
}
