package audit_test

import (
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/internal/audit"
)

// BenchmarkAppend measures durable appends, each acknowledged only after
// fsync. With more goroutines, group commit puts more records in each
// fsync; records/fsync shows how many.
func BenchmarkAppend(b *testing.B) {
	rec := gen(0)
	for _, goroutinesPerCPU := range []int{0, 1, 16, 64} {
		name := "sequential"
		if goroutinesPerCPU > 0 {
			name = fmt.Sprintf("parallel-%dxGOMAXPROCS", goroutinesPerCPU)
		}
		b.Run(name, func(b *testing.B) {
			reg := prometheus.NewRegistry()
			l := start(b, audit.Config{Dir: b.TempDir(), Signer: newSigner(b, "ecdsa-p256"), Metrics: reg})
			b.ReportAllocs()
			if goroutinesPerCPU == 0 {
				for b.Loop() {
					if _, err := l.Append(context.Background(), rec); err != nil {
						b.Fatal(err)
					}
				}
			} else {
				b.SetParallelism(goroutinesPerCPU)
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if _, err := l.Append(context.Background(), rec); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			b.StopTimer()
			l.Close()
			if batches, records := histogram(b, reg, "meshca_audit_batch_records"); batches > 0 {
				b.ReportMetric(records/batches, "records/fsync")
			}
		})
	}
}

// BenchmarkOpen100k measures opening a ledger of 100,000 records: the scan
// that rebuilds the segment index and the serial map.
func BenchmarkOpen100k(b *testing.B) {
	dir := bigLedger(b)
	b.Run("read-only", func(b *testing.B) {
		for b.Loop() {
			if _, err := audit.OpenReadOnly(dir); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("writable", func(b *testing.B) {
		for b.Loop() {
			l, err := audit.New(audit.Config{Dir: dir})
			if err != nil {
				b.Fatal(err)
			}
			l.Close()
		}
	})
}

// BenchmarkQuery100k runs queries over 100,000 records and reports how
// many records each returns.
func BenchmarkQuery100k(b *testing.B) {
	l, err := audit.OpenReadOnly(bigLedger(b))
	if err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct {
		name string
		f    audit.Filter
	}{
		{"serial", audit.Filter{Serial: gen(54321).Serial}},
		{"spiffe-id", audit.Filter{SPIFFEID: genSPIFFEID(107)}},
		{"namespace", audit.Filter{Namespace: "ns-3"}},
		{"one-hour-of-ten", audit.Filter{Since: phaseTime(4), Until: phaseTime(5)}},
		{"denied", audit.Filter{Denied: true}},
		{"valid-at", audit.Filter{ValidAt: fixtureStart.Add(30 * time.Minute)}},
		{"everything", audit.Filter{}},
		{"limit-10", audit.Filter{Limit: 10}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			n := 0
			for b.Loop() {
				n = 0
				for _, err := range l.Query(context.Background(), bc.f) {
					if err != nil {
						b.Fatal(err)
					}
					n++
				}
			}
			b.ReportMetric(float64(n), "records")
		})
	}
	b.Run("stats", func(b *testing.B) {
		for b.Loop() {
			if _, err := l.Stats(context.Background(), fixtureStart.Add(10*time.Hour)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("export", func(b *testing.B) {
		for b.Loop() {
			if _, err := l.Export(context.Background(), io.Discard, audit.Filter{}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("verify", func(b *testing.B) {
		for b.Loop() {
			if _, err := l.Verify(context.Background(), audit.VerifyOptions{}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkValidAtRecent is the query the rotation gates and the replicas'
// shared view make every few seconds: what is valid now, in a ledger whose
// older segments hold only expired certificates (here 20,000 issuances a
// minute apart, each valid an hour, in 256 KiB segments). "now" reads the
// segments that may hold a live certificate; "oldest" must read them all.
func BenchmarkValidAtRecent(b *testing.B) {
	dir := b.TempDir()
	l := start(b, audit.Config{Dir: dir, SegmentBytes: 256 << 10, CheckpointEvery: -1, CheckpointInterval: -1})
	const n = 20000
	recs := make(chan audit.Record)
	errs := make(chan error, 64)
	for range 64 {
		go func() {
			for r := range recs {
				if _, err := l.Append(context.Background(), r); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for i := range n {
		r := gen(i / 7 * 10) // an issuance
		r.Serial = fmt.Sprintf("%x", i+1)
		r.NotBefore = fixtureStart.Add(time.Duration(i) * time.Minute)
		r.NotAfter = r.NotBefore.Add(time.Hour)
		recs <- r
	}
	close(recs)
	for range 64 {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
	for name, at := range map[string]time.Time{
		"now":    fixtureStart.Add((n - 1) * time.Minute),
		"oldest": fixtureStart.Add(30 * time.Minute),
	} {
		b.Run(name, func(b *testing.B) {
			var got int
			for b.Loop() {
				got = 0
				for _, err := range l.Query(context.Background(), audit.Filter{ValidAt: at}) {
					if err != nil {
						b.Fatal(err)
					}
					got++
				}
			}
			b.ReportMetric(float64(got), "records")
		})
	}
}
