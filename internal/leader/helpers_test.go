package leader_test

import (
	"context"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/internal/leader"
	"github.com/meshca/meshca/internal/testenv"
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

// assertMetrics checks the leader gauge and the transition count. Every
// caller wants at least one transition, so an unregistered metric (which
// GatheredValue reads as 0) fails too.
func assertMetrics(t *testing.T, who string, reg *prometheus.Registry, gauge, transitions float64) {
	t.Helper()
	if got := testenv.GatheredValue(t, reg, "meshca_leader", nil); got != gauge {
		t.Errorf("%s: meshca_leader = %v, want %v", who, got, gauge)
	}
	if got := testenv.GatheredValue(t, reg, "meshca_leader_transitions_total", nil); got != transitions {
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
