package loadgen

import (
	"slices"
	"time"
)

// Latency summarises request latencies. Percentiles are exact: every sample
// is kept (their number is bounded by Config.MaxRequests) and sorted, so no
// histogram bucketing error hides in the tail.
type Latency struct {
	N                  int
	Mean               time.Duration
	P50, P95, P99, Max time.Duration
}

// summarise sorts samples in place and computes their summary.
func summarise(samples []time.Duration) Latency {
	if len(samples) == 0 {
		return Latency{}
	}
	slices.Sort(samples)
	var sum time.Duration
	for _, s := range samples {
		sum += s
	}
	return Latency{
		N:    len(samples),
		Mean: sum / time.Duration(len(samples)),
		P50:  percentile(samples, 50),
		P95:  percentile(samples, 95),
		P99:  percentile(samples, 99),
		Max:  samples[len(samples)-1],
	}
}

// percentile returns the p-th percentile of sorted by the nearest-rank
// method: the smallest sample such that at least p% of the samples are less
// than or equal to it. It is always an observed value, never an
// interpolation between two.
func percentile(sorted []time.Duration, p float64) time.Duration {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	// rank = ceil(p/100 * n), computed in integers so that e.g. p=95, n=20
	// gives exactly 19 and not 19.000000000000004 rounded up to 20.
	rank := (int(p*1000)*n + 100*1000 - 1) / (100 * 1000)
	rank = min(max(rank, 1), n)
	return sorted[rank-1]
}
