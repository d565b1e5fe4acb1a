package ca

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	issued         *prometheus.CounterVec
	clamped        prometheus.Counter
	signSeconds    prometheus.Histogram
	rootExpiry     prometheus.Gauge
	intermExpiry   prometheus.Gauge
	maintainErrors prometheus.Counter
	// maintainFailing is 1 while maintenance keeps failing.
	maintainFailing prometheus.Gauge
	issuerChanges   prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_ca_certificates_issued_total",
			Help: "Certificates issued, by kind (workload, serving).",
		}, []string{"kind"}),
		clamped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_ca_ttl_clamped_total",
			Help: "Leaves issued with a shorter lifetime than asked for (max TTL or issuer expiry).",
		}),
		signSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshca_ca_sign_duration_seconds",
			Help:    "Time to build, sign and re-verify one certificate.",
			Buckets: prometheus.ExponentialBuckets(25e-6, 2, 14),
		}),
		rootExpiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_ca_root_expiry_timestamp_seconds",
			Help: "Expiry of the earliest-expiring root in the trust bundle, as a Unix time.",
		}),
		intermExpiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_ca_issuer_expiry_timestamp_seconds",
			Help: "Expiry of the certificate that signs leaves, as a Unix time.",
		}),
		maintainErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_ca_maintenance_errors_total",
			Help: "Failed attempts to renew the intermediate or reload plugged-in CA files.",
		}),
		maintainFailing: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_ca_maintenance_failing",
			Help: "1 while the last attempt to renew the intermediate (or reload CA files) failed and is being retried; the current issuer keeps signing until meshca_ca_issuer_expiry_timestamp_seconds.",
		}),
		issuerChanges: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_ca_issuer_changes_total",
			Help: "Times the signing certificate or trust bundle changed (renewal, reload, rotation).",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.issued, m.clamped, m.signSeconds, m.rootExpiry, m.intermExpiry, m.maintainErrors, m.maintainFailing, m.issuerChanges)
	}
	return m
}
