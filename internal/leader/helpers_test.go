package leader_test

import (
	"context"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/internal/leader"
)

// run runs e until the returned stop is called or the test ends; stop
// waits for Run to return and fails the test if it returned an error.
func run(t *testing.T, e leader.Elector) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// metric returns the value of the counter or gauge name in reg.
func metric(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		m := mf.GetMetric()[0]
		if c := m.GetCounter(); c != nil {
			return c.GetValue()
		}
		return m.GetGauge().GetValue()
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// assertMetrics checks the leader gauge and the transition count.
func assertMetrics(t *testing.T, who string, reg *prometheus.Registry, gauge, transitions float64) {
	t.Helper()
	if got := metric(t, reg, "meshca_leader"); got != gauge {
		t.Errorf("%s: meshca_leader = %v, want %v", who, got, gauge)
	}
	if got := metric(t, reg, "meshca_leader_transitions_total"); got != transitions {
		t.Errorf("%s: meshca_leader_transitions_total = %v, want %v", who, got, transitions)
	}
}

// assertClosed fails unless ch has been closed.
func assertClosed(t *testing.T, what string, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	default:
		t.Errorf("%s: Changed was not closed", what)
	}
}
