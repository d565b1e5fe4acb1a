package testenv

import "testing"

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
