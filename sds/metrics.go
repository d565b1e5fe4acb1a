package sds

import (
	"maps"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	streams *prometheus.GaugeVec
	pushes  [numKinds]prometheus.Counter
	acks    [numKinds]prometheus.Counter
	nacks   [numKinds]prometheus.Counter
	stale   prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, s *Server) *metrics {
	streams := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "meshca_sds_streams",
		Help: "Connected SDS streams by protocol (sotw, delta).",
	}, []string{"protocol"})
	pushes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshca_sds_pushes_total",
		Help: "Secrets sent to proxies (or, for delta, reported removed), by resource.",
	}, []string{"resource"})
	acks := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshca_sds_acks_total",
		Help: "Secrets proxies ACKed, by resource.",
	}, []string{"resource"})
	nacks := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshca_sds_nacks_total",
		Help: "Secrets proxies rejected (NACKed), by resource.",
	}, []string{"resource"})
	m := &metrics{
		streams: streams,
		stale: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_sds_stale_requests_total",
			Help: "Requests ignored because they answered a response the server had already superseded.",
		}),
	}
	for k, n := range names {
		m.pushes[k] = pushes.WithLabelValues(n)
		m.acks[k] = acks.WithLabelValues(n)
		m.nacks[k] = nacks.WithLabelValues(n)
	}
	for _, p := range []protocol{sotw, delta} {
		streams.WithLabelValues(p.String())
	}
	if reg != nil {
		reg.MustRegister(streams, pushes, acks, nacks, m.stale, &rootCollector{s: s})
	}
	return m
}

var (
	rootAckedDesc = prometheus.NewDesc("meshca_sds_root_acked_streams",
		"Streams whose last ACKed ROOTCA contains the root with this SHA-256 fingerprint.",
		[]string{"fingerprint"}, nil)
	rootWatchingDesc = prometheus.NewDesc("meshca_sds_root_watching_streams",
		"Streams subscribed to ROOTCA: the denominator of meshca_sds_root_acked_streams.", nil, nil)
	policyAckedDesc = prometheus.NewDesc("meshca_sds_policy_acked_streams",
		"Streams (node agents) whose last ACKed mTLS policy has this version.",
		[]string{"version"}, nil)
	policyWatchingDesc = prometheus.NewDesc("meshca_sds_policy_watching_streams",
		"Streams subscribed to the mTLS policy: the denominator of meshca_sds_policy_acked_streams.", nil, nil)
)

// rootCollector reads the ACK accounting of the bundle and the policy at
// scrape time, so an ACK costs a map update rather than a gauge per
// fingerprint or version to keep in step.
type rootCollector struct{ s *Server }

func (c *rootCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- rootAckedDesc
	ch <- rootWatchingDesc
	ch <- policyAckedDesc
	ch <- policyWatchingDesc
}

func (c *rootCollector) Collect(ch chan<- prometheus.Metric) {
	c.s.mu.Lock()
	roots := maps.Clone(c.s.rootAcks)
	policies := maps.Clone(c.s.policyAcks)
	rootWatchers, policyWatchers := c.s.rootWatchers, c.s.policyWatchers
	c.s.mu.Unlock()
	for fp, n := range roots {
		ch <- prometheus.MustNewConstMetric(rootAckedDesc, prometheus.GaugeValue, float64(n), fp)
	}
	ch <- prometheus.MustNewConstMetric(rootWatchingDesc, prometheus.GaugeValue, float64(rootWatchers))
	for v, n := range policies {
		ch <- prometheus.MustNewConstMetric(policyAckedDesc, prometheus.GaugeValue, float64(n), v)
	}
	ch <- prometheus.MustNewConstMetric(policyWatchingDesc, prometheus.GaugeValue, float64(policyWatchers))
}
