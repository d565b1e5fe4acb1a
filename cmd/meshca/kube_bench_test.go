package main

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/internal/loadgen"
	"github.com/meshca/meshca/internal/testenv"
)

// BenchmarkCSRWithTokenReview loads `meshca server` authenticating with
// TokenReview against a real API server, with the review cache on (one
// review per token, then informer lookups) and off (one review per
// request), and reports the API server's TokenReview count next to the
// certificate rate and the bare-signing baseline of the same run. Every
// request carries the same pod-bound token, as an agent renewing and
// restarting does. Run it with -benchtime=1x: one iteration is one timed
// load of benchLoad.
func BenchmarkCSRWithTokenReview(b *testing.B) {
	env := testenv.StartKube(b)
	env.CreateServiceAccount(b, "bench", "loadgen")
	pod := env.CreatePod(b, "bench", "loadgen-0", "loadgen")
	// Without the cache the client's rate limit (default 50 QPS) is the
	// ceiling; the last case lifts it to show what the API server itself
	// sustains.
	for _, bc := range []struct{ name, ttl, qps string }{
		{"cache=on", "5m", "50"}, {"cache=off", "0", "50"}, {"cache=off,qps=5000", "0", "5000"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			dir := b.TempDir()
			pass := writeFile(b, "pass", []byte("correct horse battery staple"))
			addr := startServer(b, "--data-dir", dir, "--keystore-passphrase-file", pass, "--kubeconfig", env.Kubeconfig(),
				"--bundle-out", filepath.Join(dir, "bundle.pem"), "--token-cache-ttl", bc.ttl, "--kube-qps", bc.qps, "--kube-burst", bc.qps)
			bundle, err := caclient.LoadBundle(filepath.Join(dir, "bundle.pem"))
			if err != nil {
				b.Fatal(err)
			}
			tok := env.Token(b, "bench", "loadgen", []string{"meshca"}, time.Hour, pod)
			for range b.N {
				before := tokenReviews(b, env)
				res, err := loadgen.Run(context.Background(), loadgen.Config{Addr: addr, TrustBundle: bundle, Token: tok,
					Duration: benchLoad, ReferenceDuration: time.Second})
				if err != nil {
					b.Fatal(err)
				}
				if res.Failed() != 0 {
					b.Fatalf("%d requests failed: %v", res.Failed(), res.Errors)
				}
				n := tokenReviews(b, env) - before
				b.ReportMetric(res.PerSecond(), "certs/s")
				b.ReportMetric(res.References.Baseline.PerSecond(), "baseline-certs/s")
				b.ReportMetric(float64(res.Latency.P99.Microseconds())/1000, "p99-ms")
				b.ReportMetric(float64(res.Requests+res.Warmup), "requests")
				b.ReportMetric(n, "tokenreviews")
			}
		})
	}
}

const benchLoad = 10 * time.Second
