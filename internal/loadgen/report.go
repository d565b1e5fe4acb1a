package loadgen

import (
	"fmt"
	"io"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
)

// WriteText writes the result for people.
func (r *Result) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	p := func(format string, args ...any) { fmt.Fprintf(tw, format+"\n", args...) }

	p("machine\t%d CPUs, GOMAXPROCS %d, %s %s/%s", runtime.NumCPU(), r.GOMAXPROCS, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	target := r.Target
	if r.InProcess {
		target += " (in-process server: self-managed P-256 CA, " + r.Keys + " keys, dev token authenticator)"
	}
	p("target\t%s", target)
	p("client keys\t%d P-256 keys and CSRs generated in %s before timing (the client's cost, not the CA's)",
		r.CSRPool, r.CSRPoolTime.Round(time.Millisecond))
	if r.IdleBefore >= 0 {
		p("CPU idle\t%.0f%% in the %s before the run (anything else running competes with the benchmark)", 100*r.IdleBefore, idleWindow)
	}
	p("")

	refs := r.References
	p("in-process references (%d goroutines, %s each, measured just before the load)", refs.Baseline.Workers, refs.Baseline.Elapsed.Round(100*time.Millisecond))
	p("  x509.CreateCertificate, P-256 SVID\t%8.0f/s\tbaseline", refs.Baseline.PerSecond())
	p("  Authority.Issue: CSR check, sign, chain verify\t%8.0f/s\tminimum crypto per issuance", refs.Issue.PerSecond())
	p("  dev token verification + Authority.Issue\t%8.0f/s\tthe server's work minus TLS and gRPC", refs.AuthIssue.PerSecond())
	p("")

	p("load: %d clients on %d TLS connections for %s, rate %s; %d warm-up requests untimed",
		r.Concurrency, r.Connections, r.Duration, rateString(r.TargetRate), r.Warmup)
	if r.Capped {
		p("  stopped early: reached the request limit")
	}
	p("  certificates\t%d in %s = %.0f/s", r.Issued, r.Elapsed.Round(time.Millisecond), r.PerSecond())
	l := r.Latency
	p("  latency\tp50 %s  p95 %s  p99 %s  max %s  mean %s  (n=%d%s)",
		fmtLatency(l.P50), fmtLatency(l.P95), fmtLatency(l.P99), fmtLatency(l.Max), fmtLatency(l.Mean), l.N, latencyOrigin(r.TargetRate))
	if r.TargetRate > 0 {
		s := r.SendLag
		p("  send lag\tp50 %s  p95 %s  p99 %s  max %s  (load generator's lateness, included in latency)",
			fmtLatency(s.P50), fmtLatency(s.P95), fmtLatency(s.P99), fmtLatency(s.Max))
	}
	p("  errors\t%s", r.errorSummary())
	if r.LedgerBatches > 0 {
		p("  audit ledger\t%d records in %d group commits (fsyncs), %.1f per commit",
			r.LedgerRecords, r.LedgerBatches, float64(r.LedgerRecords)/float64(r.LedgerBatches))
	}
	capped := ""
	if r.TargetRate > 0 {
		capped = "  (rate-limited: offered load, not capacity)"
	}
	p("  end-to-end / baseline\t%.1f%%%s", 100*r.BaselineRatio(), capped)
	p("  end-to-end / minimum crypto\t%.1f%%%s", 100*r.IssueRatio(), capped)
	p("  end-to-end / token + Issue\t%.1f%%%s", 100*r.AuthIssueRatio(), capped)
	p("")
	p("The load generator shares this machine's %d CPUs with the server.", runtime.NumCPU())
	return tw.Flush()
}

func latencyOrigin(rate float64) string {
	if rate > 0 {
		return ", from when each request was due"
	}
	return ""
}

func (r *Result) errorSummary() string {
	n := r.Failed()
	if n == 0 {
		return "0"
	}
	codesSeen := make([]codes.Code, 0, len(r.Errors))
	for c := range r.Errors {
		codesSeen = append(codesSeen, c)
	}
	slices.Sort(codesSeen)
	parts := make([]string, 0, len(codesSeen)+1)
	for _, c := range codesSeen {
		parts = append(parts, fmt.Sprintf("%s %d", c, r.Errors[c]))
	}
	if r.BadResponses > 0 {
		parts = append(parts, fmt.Sprintf("response without a certificate chain %d", r.BadResponses))
	}
	return fmt.Sprintf("%d of %d requests (%s)", n, r.Requests, strings.Join(parts, ", "))
}

// fmtLatency shows every latency in the same unit, so they line up and
// compare at a glance.
func fmtLatency(d time.Duration) string {
	return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
}
