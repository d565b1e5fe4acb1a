package peers

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	writes      *prometheus.CounterVec
	readFailing prometheus.Gauge
	replicas    *prometheus.GaugeVec
	entryBytes  prometheus.Gauge
	objectBytes prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_peers_writes_total",
			Help: "Writes of this replica's entry in the replicas' shared ConfigMap, by result: written, conflict (another replica wrote first; retried) or failed.",
		}, []string{"result"}),
		readFailing: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_peers_read_failing",
			Help: "1 while the replicas' shared ConfigMap cannot be read, which keeps root rotation's activate and retire closed on this replica.",
		}),
		replicas: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshca_peers_replicas",
			Help: "Other replicas' entries in the shared ConfigMap at the last read, by state: fresh (their streams count), stale (only their certificates count) or unreadable (gates closed).",
		}, []string{"state"}),
		entryBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_peers_entry_bytes",
			Help: "Size of this replica's last written entry (gzipped JSON).",
		}),
		objectBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshca_peers_configmap_bytes",
			Help: "Size of the shared ConfigMap's data at the last write; the API server refuses more than 1 MiB.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.writes, m.readFailing, m.replicas, m.entryBytes, m.objectBytes)
	}
	return m
}
