package testenv

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// GatheredValue is MetricValue for the metrics g gathers, such as a test's
// own prometheus.Registry.
func GatheredValue(t testing.TB, g prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := g.Gather()
	if err != nil {
		t.Fatalf("testenv: gathering metrics: %v", err)
	}
	for _, mf := range families {
		if mf.GetName() == name {
			return sumSeries(mf, labels)
		}
	}
	return 0
}

// sumMetric sums metric name in the text exposition format, as MetricValue
// describes.
func sumMetric(text, name string, labels map[string]string) (float64, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		return 0, fmt.Errorf("parsing /metrics: %w", err)
	}
	mf, ok := families[name]
	if !ok {
		return 0, nil
	}
	return sumSeries(mf, labels), nil
}

// sumSeries sums mf over the series whose labels include all of labels.
func sumSeries(mf *dto.MetricFamily, labels map[string]string) float64 {
	var sum float64
next:
	for _, m := range mf.GetMetric() {
		have := make(map[string]string, len(m.GetLabel()))
		for _, lp := range m.GetLabel() {
			have[lp.GetName()] = lp.GetValue()
		}
		for k, v := range labels {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Untyped != nil:
			sum += m.GetUntyped().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		case m.Summary != nil:
			sum += float64(m.GetSummary().GetSampleCount())
		}
	}
	return sum
}

// ScrapedValue is MetricValue for a /metrics endpoint at url, as a server
// under test exposes it.
func ScrapedValue(t testing.TB, url, name string, labels map[string]string) float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("testenv: scraping %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("testenv: scraping %s: HTTP %d, %v", url, resp.StatusCode, err)
	}
	v, err := sumMetric(string(body), name, labels)
	if err != nil {
		t.Fatalf("testenv: %s: %v", url, err)
	}
	return v
}
