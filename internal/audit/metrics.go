package audit

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	records          *prometheus.CounterVec
	batchSeconds     prometheus.Histogram
	batchRecords     prometheus.Histogram
	verifyFailures   prometheus.Counter
	unavailable      prometheus.Counter
	mirrorErrors     prometheus.Counter
	checkpointErrors prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		records: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_audit_records_total",
			Help: "Records made durable in the audit ledger, by kind (issued, denied, admin, checkpoint).",
		}, []string{"kind"}),
		batchSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshca_audit_batch_duration_seconds",
			Help:    "Time to encode, write and fsync one group-committed batch of audit records.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 16),
		}),
		batchRecords: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshca_audit_batch_records",
			Help:    "Appended records per batch, that is per fsync (checkpoints not counted).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 13),
		}),
		verifyFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_audit_verify_failures_total",
			Help: "Verify runs that found the ledger broken or tampered with.",
		}),
		unavailable: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_audit_unavailable_total",
			Help: "Batches refused because the ledger could not write or sync them.",
		}),
		mirrorErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_audit_mirror_errors_total",
			Help: "Failed writes of durable records to the mirror sink.",
		}),
		checkpointErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_audit_checkpoint_errors_total",
			Help: "Checkpoints that could not be signed.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.records, m.batchSeconds, m.batchRecords, m.verifyFailures,
			m.unavailable, m.mirrorErrors, m.checkpointErrors)
	}
	return m
}
