// Package benchtest holds helpers shared by meshca's benchmarks.
package benchtest

import "testing"

// SequentialAndParallel runs op once per iteration on one goroutine
// ("sequential") and on GOMAXPROCS goroutines ("parallel"). The parallel
// ns/op is wall time divided by operations: the inverse of the machine's
// throughput.
func SequentialAndParallel(b *testing.B, op func(b *testing.B)) {
	b.Run("sequential", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			op(b)
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				op(b)
			}
		})
	})
}
