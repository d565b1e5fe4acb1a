package audit_test

import (
	"context"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/meshca/meshca/internal/audit"
)

const (
	bigRecords = 100_000
	bigPhases  = 10
)

// big is a ledger of gen(0) ... gen(bigRecords-1), shared by the 100k tests
// and benchmarks and removed by TestMain.
var bigLedgerState struct {
	once  sync.Once
	dir   string
	err   error
	built time.Duration
}

func TestMain(m *testing.M) {
	code := m.Run()
	if bigLedgerState.dir != "" {
		os.RemoveAll(bigLedgerState.dir)
	}
	os.Exit(code)
}

// phaseOf is the phase gen(i) is appended in; phase p is appended at
// phaseTime(p), by a fake clock.
func phaseOf(i int) int         { return i / (bigRecords / bigPhases) }
func phaseTime(p int) time.Time { return fixtureStart.Add(time.Duration(p) * time.Hour) }

// bigLedger returns the directory of the shared 100k ledger, building it on
// first use. It appends from many goroutines so that group commit keeps the
// number of fsyncs, and the time, down.
func bigLedger(tb testing.TB) string {
	tb.Helper()
	bigLedgerState.once.Do(func() {
		began := time.Now()
		bigLedgerState.dir, bigLedgerState.err = os.MkdirTemp("", "meshca-audit-100k-")
		if bigLedgerState.err != nil {
			return
		}
		clock := clockwork.NewFakeClockAt(fixtureStart)
		l, err := audit.New(audit.Config{
			Dir:                bigLedgerState.dir,
			Signer:             newSigner(tb, "ecdsa-p256"),
			SegmentBytes:       4 << 20,
			CheckpointInterval: -1,
			Clock:              clock,
		})
		if err != nil {
			bigLedgerState.err = err
			return
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- l.Run(ctx) }()
		const workers = 256
		per := bigRecords / bigPhases
		var mu sync.Mutex
		for p := range bigPhases {
			var wg sync.WaitGroup
			for w := range workers {
				wg.Go(func() {
					for i := p*per + w; i < (p+1)*per; i += workers {
						if _, err := l.Append(ctx, gen(i)); err != nil {
							mu.Lock()
							bigLedgerState.err = err
							mu.Unlock()
							return
						}
					}
				})
			}
			wg.Wait()
			clock.Advance(time.Hour)
		}
		cancel()
		<-done
		if err := l.Close(); err != nil && bigLedgerState.err == nil {
			bigLedgerState.err = err
		}
		bigLedgerState.built = time.Since(began)
	})
	if bigLedgerState.err != nil {
		tb.Fatalf("building the 100k ledger: %v", bigLedgerState.err)
	}
	return bigLedgerState.dir
}
