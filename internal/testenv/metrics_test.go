package testenv

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestSumMetric(t *testing.T) {
	const text = `# TYPE apiserver_request_total counter
apiserver_request_total{code="201",resource="tokenreviews",verb="POST"} 3
apiserver_request_total{code="400",resource="tokenreviews",verb="POST"} 1
apiserver_request_total{code="200",resource="pods",verb="GET"} 7
# TYPE d histogram
d_bucket{le="+Inf"} 4
d_sum 1
d_count 4
`
	for _, tc := range []struct {
		name   string
		metric string
		labels map[string]string
		want   float64
	}{
		{"filtered", "apiserver_request_total", map[string]string{"resource": "tokenreviews"}, 4},
		{"two labels", "apiserver_request_total", map[string]string{"resource": "tokenreviews", "code": "400"}, 1},
		{"all series", "apiserver_request_total", nil, 11},
		{"no match", "apiserver_request_total", map[string]string{"resource": "secrets"}, 0},
		{"absent metric", "nothing_total", nil, 0},
		{"histogram count", "d", nil, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := sumMetric(text, tc.metric, tc.labels)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestGatheredValue(t *testing.T) {
	reg := prometheus.NewRegistry()
	logins := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "logins_total"}, []string{"method", "result"})
	latency := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "latency_seconds"})
	reg.MustRegister(logins, latency)
	logins.WithLabelValues("approle", "ok").Add(3)
	logins.WithLabelValues("approle", "error").Add(1)
	logins.WithLabelValues("kubernetes", "ok").Add(2)
	latency.Observe(0.1)
	latency.Observe(0.2)
	for _, tc := range []struct {
		name   string
		metric string
		labels map[string]string
		want   float64
	}{
		{"filtered", "logins_total", map[string]string{"result": "ok"}, 5},
		{"two labels", "logins_total", map[string]string{"method": "approle", "result": "error"}, 1},
		{"all series", "logins_total", nil, 6},
		{"no match", "logins_total", map[string]string{"method": "token"}, 0},
		{"absent metric", "nothing_total", nil, 0},
		{"histogram count", "latency_seconds", nil, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := GatheredValue(t, reg, tc.metric, tc.labels); got != tc.want {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}
