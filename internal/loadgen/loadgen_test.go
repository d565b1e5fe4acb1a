package loadgen

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func ms(n int) time.Duration { return time.Duration(n) * time.Millisecond }

func TestPercentile(t *testing.T) {
	oneTo := func(n int) []time.Duration {
		s := make([]time.Duration, n)
		for i := range s {
			s[i] = ms(i + 1)
		}
		return s
	}
	tests := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 50, 0},
		{"single p50", oneTo(1), 50, ms(1)},
		{"single p99", oneTo(1), 99, ms(1)},
		{"two p50", oneTo(2), 50, ms(1)},
		{"two p51", oneTo(2), 51, ms(2)},
		{"ten p50", oneTo(10), 50, ms(5)},
		{"ten p95", oneTo(10), 95, ms(10)},
		{"ten p99", oneTo(10), 99, ms(10)},
		{"twenty p95 is exact", oneTo(20), 95, ms(19)},
		{"hundred p50", oneTo(100), 50, ms(50)},
		{"hundred p95", oneTo(100), 95, ms(95)},
		{"hundred p99", oneTo(100), 99, ms(99)},
		{"hundred p100", oneTo(100), 100, ms(100)},
		{"hundred p0 is the minimum", oneTo(100), 0, ms(1)},
		{"thousand p99", oneTo(1000), 99, ms(990)},
		{"thousand p99.9", oneTo(1000), 99.9, ms(999)},
		{"1001 p50 rounds up", oneTo(1001), 50, ms(501)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := percentile(tt.sorted, tt.p); got != tt.want {
				t.Errorf("percentile(%d samples, %g) = %s, want %s", len(tt.sorted), tt.p, got, tt.want)
			}
		})
	}
}

func TestSummarise(t *testing.T) {
	if got := summarise(nil); got != (Latency{}) {
		t.Errorf("summarise(nil) = %+v, want zero", got)
	}
	// Unsorted on purpose: summarise sorts.
	samples := []time.Duration{ms(4), ms(1), ms(3), ms(2)}
	got := summarise(samples)
	want := Latency{N: 4, Mean: 2500 * time.Microsecond, P50: ms(2), P95: ms(4), P99: ms(4), Max: ms(4)}
	if got != want {
		t.Errorf("summarise = %+v, want %+v", got, want)
	}
}

func TestScheduleRate(t *testing.T) {
	start := time.Unix(1000, 0)
	s := newSchedule(start, 100*time.Millisecond, 40, 1000) // one every 25ms
	var dues []time.Duration
	for {
		_, due, ok := s.next()
		if !ok {
			break
		}
		dues = append(dues, due.Sub(start))
	}
	want := []time.Duration{0, ms(25), ms(50), ms(75)}
	if len(dues) != len(want) {
		t.Fatalf("due offsets %v, want %v", dues, want)
	}
	for i := range want {
		if dues[i] != want[i] {
			t.Errorf("request %d due at +%s, want +%s", i, dues[i], want[i])
		}
	}
	if s.capped.Load() {
		t.Error("capped, but the deadline ended the schedule")
	}
}

func TestScheduleDeadlineBeforeCap(t *testing.T) {
	// Exactly as many slots as the limit fit before the deadline; the
	// clock, not the limit, ends the run.
	s := newSchedule(time.Unix(1000, 0), 100*time.Millisecond, 40, 4)
	n := 0
	for i := 0; i < 10; i++ {
		if _, _, ok := s.next(); ok {
			n++
		}
	}
	if n != 4 || s.capped.Load() {
		t.Errorf("handed out %d slots, capped=%t; want 4 and not capped", n, s.capped.Load())
	}
}

func TestScheduleCap(t *testing.T) {
	s := newSchedule(time.Now(), time.Hour, 0, 3)
	n := 0
	for {
		if _, _, ok := s.next(); !ok {
			break
		}
		n++
	}
	if n != 3 || !s.capped.Load() {
		t.Errorf("handed out %d slots, capped=%t; want 3 and capped", n, s.capped.Load())
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{"no target", Config{}, "no target address"},
		{"remote host", Config{Addr: "meshca.example:15012", Token: "t"}, "not a loopback address"},
		{"private IP", Config{Addr: "10.0.0.1:15012", Token: "t"}, "not a loopback address"},
		{"no port", Config{Addr: "127.0.0.1"}, "missing port"},
		{"in-process with a target", Config{InProcess: true, Addr: "127.0.0.1:1"}, "brings its own server"},
		{"too long", Config{InProcess: true, Duration: 2 * time.Hour}, "duration"},
		{"more connections than clients", Config{InProcess: true, Concurrency: 2, Connections: 3}, "3 connections for 2 clients"},
		{"negative rate", Config{InProcess: true, Rate: -1}, "negative rate"},
		{"defaults", Config{InProcess: true}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.validate()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("validate: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("validate: %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
	for _, addr := range []string{"127.0.0.1:15012", "[::1]:15012", "localhost:15012", "127.1.2.3:1"} {
		if err := checkLoopback(addr); err != nil {
			t.Errorf("checkLoopback(%q): %v", addr, err)
		}
	}
}

// quick keeps runs short: the tests assert counts, never rates or
// latencies, which depend on the machine.
func quick(cfg Config) Config {
	if cfg.ReferenceDuration == 0 {
		cfg.ReferenceDuration = 20 * time.Millisecond
	}
	cfg.CSRPool = 4
	if cfg.Concurrency == 0 {
		cfg.Concurrency = 2
	}
	if cfg.Duration == 0 {
		cfg.Duration = 200 * time.Millisecond
	}
	return cfg
}

// checkConsistent asserts what must hold for any successful run.
func checkConsistent(t *testing.T, r Result) {
	t.Helper()
	if r.Issued == 0 {
		t.Fatal("no certificates issued")
	}
	if f := r.Failed(); f != 0 {
		t.Errorf("%d failed requests: %v, %d bad responses", f, r.Errors, r.BadResponses)
	}
	if r.Requests != r.Issued+r.Failed() {
		t.Errorf("requests %d != issued %d + failed %d", r.Requests, r.Issued, r.Failed())
	}
	if r.Latency.N != r.Issued {
		t.Errorf("latency over %d samples, want one per issued certificate (%d)", r.Latency.N, r.Issued)
	}
	l := r.Latency
	if l.P50 <= 0 || l.P50 > l.P95 || l.P95 > l.P99 || l.P99 > l.Max || l.Mean > l.Max {
		t.Errorf("latency summary out of order: %+v", l)
	}
	if r.Warmup != r.Concurrency {
		t.Errorf("warm-up requests %d, want one per client (%d)", r.Warmup, r.Concurrency)
	}
	for name, tp := range map[string]Throughput{
		"baseline": r.References.Baseline, "issue": r.References.Issue, "auth+issue": r.References.AuthIssue,
	} {
		if tp.Ops <= 0 || tp.Elapsed <= 0 || tp.Workers != r.GOMAXPROCS {
			t.Errorf("%s reference %+v: want operations, time and GOMAXPROCS workers", name, tp)
		}
	}
	if want := r.PerSecond() / r.References.Baseline.PerSecond(); r.BaselineRatio() != want {
		t.Errorf("baseline ratio %g, want %g", r.BaselineRatio(), want)
	}
	if r.Elapsed <= 0 || r.Target == "" {
		t.Errorf("elapsed %s, target %q", r.Elapsed, r.Target)
	}
	var out strings.Builder
	if err := r.WriteText(&out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"certificates", "p99", "baseline", "minimum crypto"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
}

func TestRunInProcess(t *testing.T) {
	r, err := Run(t.Context(), quick(Config{InProcess: true}))
	if err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, r)
	if !r.InProcess || r.Capped {
		t.Errorf("in-process %t, capped %t; want true, false", r.InProcess, r.Capped)
	}
}

func TestRunRateIsExact(t *testing.T) {
	// 50/s for 200ms: requests are due at 0, 20, ..., 180ms, ten in all,
	// however fast or slow the machine is.
	r, err := Run(t.Context(), quick(Config{InProcess: true, Rate: 50}))
	if err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, r)
	if r.Requests != 10 {
		t.Errorf("%d requests at 50/s for 200ms, want 10", r.Requests)
	}
}

func TestRunAgainstServer(t *testing.T) {
	ctx := t.Context()
	srv, err := StartServer(ctx, ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Error(err)
		}
	})
	tok, err := srv.MintToken(time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	// The request limit, not the hour, ends this run.
	r, err := Run(ctx, quick(Config{Addr: srv.Addr(), TrustBundle: srv.TrustBundle(), Token: tok,
		Concurrency: 3, Connections: 1, Duration: time.Hour, MaxRequests: 7}))
	if err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, r)
	if r.Requests != 7 || !r.Capped || r.Connections != 1 {
		t.Errorf("requests %d, capped %t, connections %d; want 7, true, 1", r.Requests, r.Capped, r.Connections)
	}

	_, err = Run(ctx, quick(Config{Addr: srv.Addr(), TrustBundle: srv.TrustBundle(), Token: "not-a-token"}))
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("run with a bad token: %v, want an Unauthenticated warm-up failure", err)
	}
}

// cancelOn is a log handler that cancels a context when a given message
// is logged, to interrupt a run at a known phase.
type cancelOn struct {
	slog.Handler
	msg    string
	cancel context.CancelFunc
}

// Enabled is true: slog.DiscardHandler's false would keep Handle from being
// called at all.
func (cancelOn) Enabled(context.Context, slog.Level) bool { return true }

func (h cancelOn) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == h.msg {
		h.cancel()
	}
	return h.Handler.Handle(ctx, r)
}

func TestRunInterrupted(t *testing.T) {
	// Runs that only the cancellation can end in reasonable time: a
	// minute per reference, an hour of load.
	for _, tt := range []struct {
		phase string
		ref   time.Duration
	}{
		{"measuring the in-process references", time.Minute},
		{"load", 0},
	} {
		t.Run(tt.phase, func(t *testing.T) {
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			log := slog.New(cancelOn{Handler: slog.DiscardHandler, msg: tt.phase, cancel: cancel})
			_, err := Run(ctx, quick(Config{InProcess: true, Duration: time.Hour, ReferenceDuration: tt.ref, Logger: log}))
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("interrupted run: %v, want context.Canceled", err)
			}
		})
	}
}
