package audit_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/internal/audit"
)

func TestReopenContinuesChain(t *testing.T) {
	dir := t.TempDir()
	signer := newSigner(t, "ecdsa-p256")
	cfg := audit.Config{Dir: dir, Signer: signer, CheckpointEvery: 7}
	for round := range 3 {
		l := start(t, cfg)
		for i := range 10 {
			mustAppend(t, l, gen(round*10+i))
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
	}
	l, err := audit.OpenReadOnly(dir)
	if err != nil {
		t.Fatal(err)
	}
	rep := mustVerify(t, l)
	// 30 records, one checkpoint after every 7 of them.
	if rep.Records != 34 || rep.Checkpoints != 4 || rep.FirstSeq != 1 || rep.LastSeq != 34 {
		t.Errorf("report %+v, want 34 records with 4 checkpoints", rep)
	}
	var ids []int
	for _, r := range all(t, l, audit.Filter{Kinds: []audit.Kind{audit.KindIssued, audit.KindDenied, audit.KindAdmin}}) {
		ids = append(ids, genID(r))
	}
	want := make([]int, 30)
	for i := range want {
		want[i] = i
	}
	if !slices.Equal(ids, want) {
		t.Errorf("records %v, want %v", ids, want)
	}
}

func TestAppendRejects(t *testing.T) {
	l := start(t, audit.Config{Dir: t.TempDir()})
	for _, tt := range []struct {
		name string
		rec  audit.Record
	}{
		{"no kind", audit.Record{Actor: "a"}},
		{"unknown kind", audit.Record{Kind: "other"}},
		{"checkpoint", audit.Record{Kind: audit.KindCheckpoint}},
		{"checkpoint fields", audit.Record{Kind: audit.KindAdmin, Head: strings.Repeat("0", 64)}},
		{"too large", audit.Record{Kind: audit.KindDenied, Detail: strings.Repeat("x", 70<<10)}},
		{"unencodable time", audit.Record{Kind: audit.KindIssued, NotAfter: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := l.Append(t.Context(), tt.rec)
			if err == nil {
				t.Fatalf("Append accepted it as %+v", got)
			}
			if errors.Is(err, audit.ErrUnavailable) {
				t.Errorf("a bad record is reported as the ledger being unavailable: %v", err)
			}
		})
	}
	// The refused records took no seq.
	if r := mustAppend(t, l, gen(0)); r.Seq != 1 {
		t.Errorf("first accepted record has seq %d, want 1", r.Seq)
	}
}

func TestAppendWithoutRunHonoursContext(t *testing.T) {
	l, err := audit.New(audit.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if _, err := l.Append(ctx, gen(0)); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Append without Run = %v, want context.DeadlineExceeded", err)
	}
}

// TestCloseWritesQueued appends with no Run at all: Close must write what is
// queued and answer it.
func TestCloseWritesQueued(t *testing.T) {
	dir := t.TempDir()
	l, err := audit.New(audit.Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	const n = 20
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			_, err := l.Append(context.Background(), gen(i))
			errs <- err
		})
	}
	// Let the appends queue up; those not queued yet get ErrClosed.
	time.Sleep(50 * time.Millisecond)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	written := 0
	for err := range errs {
		switch {
		case err == nil:
			written++
		case !errors.Is(err, audit.ErrClosed):
			t.Errorf("Append = %v, want success or ErrClosed", err)
		}
	}
	if written == 0 {
		t.Fatal("Close wrote none of the queued appends")
	}
	if _, err := l.Append(t.Context(), gen(0)); !errors.Is(err, audit.ErrClosed) {
		t.Errorf("Append after Close = %v, want ErrClosed", err)
	}
	if err := l.Run(t.Context()); !errors.Is(err, audit.ErrClosed) {
		t.Errorf("Run after Close = %v, want ErrClosed", err)
	}
	ro, err := audit.OpenReadOnly(dir)
	if err != nil {
		t.Fatal(err)
	}
	if rep := mustVerify(t, ro); rep.Records != written {
		t.Errorf("ledger holds %d records, %d appends succeeded", rep.Records, written)
	}
}

func TestRunOnlyOnce(t *testing.T) {
	l := start(t, audit.Config{Dir: t.TempDir()})
	mustAppend(t, l, gen(0)) // Run is up
	if err := l.Run(t.Context()); err == nil {
		t.Error("a second Run started")
	}
}

func TestTimeNeverGoesBack(t *testing.T) {
	clock := clockwork.NewFakeClockAt(fixtureStart)
	l := start(t, audit.Config{Dir: t.TempDir(), Clock: clock})
	a := mustAppend(t, l, gen(0))
	clock.Advance(-time.Hour)
	b := mustAppend(t, l, gen(1))
	clock.Advance(2 * time.Hour)
	c := mustAppend(t, l, gen(2))
	if !a.Time.Equal(fixtureStart) || !b.Time.Equal(a.Time) || !c.Time.Equal(fixtureStart.Add(time.Hour)) {
		t.Errorf("times %v, %v, %v; want %v twice, then an hour later", a.Time, b.Time, c.Time, fixtureStart)
	}
	mustVerify(t, l)
}

// countingFile counts syncs and can hold the first one until released.
type countingFile struct {
	*os.File
	syncs *atomic.Int64
	gate  chan struct{}
}

func (f countingFile) Sync() error {
	if f.syncs.Add(1) == 1 && f.gate != nil {
		<-f.gate
	}
	return f.File.Sync()
}

// TestGroupCommit holds the first fsync while many appends queue up; they
// must then go out together.
func TestGroupCommit(t *testing.T) {
	var syncs atomic.Int64
	gate := make(chan struct{})
	cfg := audit.Config{
		Dir: t.TempDir(),
		OpenFile: func(name string, flag int, perm fs.FileMode) (audit.File, error) {
			f, err := os.OpenFile(name, flag, perm)
			if err != nil {
				return nil, err
			}
			return countingFile{File: f, syncs: &syncs, gate: gate}, nil
		},
	}
	reg := prometheus.NewRegistry()
	cfg.Metrics = reg
	l := start(t, cfg)

	const n = 100
	var wg sync.WaitGroup
	wg.Go(func() { tryAppend(t, l, gen(0)) })
	for syncs.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	var started atomic.Int64
	for i := 1; i < n; i++ {
		wg.Go(func() {
			started.Add(1)
			tryAppend(t, l, gen(i))
		})
	}
	// Let them all queue up behind the held fsync.
	for started.Load() < n-1 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	close(gate)
	wg.Wait()
	l.Close()

	if got := syncs.Load(); got > 3 {
		t.Errorf("%d records took %d fsyncs, want them grouped into at most 3", n, got)
	}
	if c, s := histogram(t, reg, "meshca_audit_batch_records"); c != float64(syncs.Load()) || s != n {
		t.Errorf("batch size histogram: %v batches, %v records; want %d batches, %d records", c, s, syncs.Load(), n)
	}
	rep := mustVerify(t, l)
	if rep.Records != n {
		t.Errorf("ledger holds %d records, want %d", rep.Records, n)
	}
}

// A steady stream of appends is synced in batches spaced by CommitDelay,
// not one fsync per record: the first append after a quiet spell is written
// at once, and those arriving within the delay after it share one commit.
func TestCommitDelayGroupsAppends(t *testing.T) {
	var syncs atomic.Int64
	reg := prometheus.NewRegistry()
	l := start(t, audit.Config{
		Dir:         t.TempDir(),
		CommitDelay: 500 * time.Millisecond,
		Metrics:     reg,
		OpenFile: func(name string, flag int, perm fs.FileMode) (audit.File, error) {
			f, err := os.OpenFile(name, flag, perm)
			if err != nil {
				return nil, err
			}
			return countingFile{File: f, syncs: &syncs}, nil
		},
	})
	mustAppend(t, l, gen(0))
	if got := syncs.Load(); got != 1 {
		t.Fatalf("first append: %d fsyncs, want 1", got)
	}
	const n = 50
	var wg sync.WaitGroup
	for i := 1; i <= n; i++ {
		wg.Go(func() { tryAppend(t, l, gen(i)) })
	}
	wg.Wait()
	if got := syncs.Load(); got != 2 {
		t.Errorf("%d appends within the commit delay took %d fsyncs in all, want 1 more", n, got-1)
	}
	if c, s := histogram(t, reg, "meshca_audit_batch_records"); c != 2 || s != n+1 {
		t.Errorf("batch size histogram: %v batches, %v records; want 2 batches, %d records", c, s, n+1)
	}
	l.Close()
	if rep := mustVerify(t, l); rep.Records != n+1 {
		t.Errorf("ledger holds %d records, want %d", rep.Records, n+1)
	}
}

func TestSegments(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "audit")
	l := start(t, audit.Config{Dir: dir, SegmentBytes: 4 << 10, Signer: newSigner(t, "ecdsa-p256"), CheckpointEvery: -1})
	for i := range 100 {
		mustAppend(t, l, gen(i))
	}
	l.Close()

	segs := segments(t, dir)
	if len(segs) < 5 {
		t.Fatalf("%d segments of 4 KiB for 100 records, want several", len(segs))
	}
	wantFirst := uint64(1)
	for i, path := range segs {
		if name := filepath.Base(path); name != fmt.Sprintf("seg-%020d.log", wantFirst) {
			t.Errorf("segment %d is %s, want it named for seq %d", i, name, wantFirst)
		}
		if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", path, fi.Mode())
		}
		ls := lines(t, path)
		last := decode(t, ls[len(ls)-1])
		// Every full segment ends with a checkpoint, so Prune can cut
		// after it; CheckpointEvery is off, so no other triggers.
		if i < len(segs)-1 && last.Kind != audit.KindCheckpoint {
			t.Errorf("full segment %s ends with a %s, want a checkpoint", path, last.Kind)
		}
		wantFirst = last.Seq + 1
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("directory has mode %v, want 0700", fi.Mode())
	}
	ro, err := audit.OpenReadOnly(dir)
	if err != nil {
		t.Fatal(err)
	}
	if rep := mustVerify(t, ro); rep.Segments != len(segs) {
		t.Errorf("Verify read %d segments, want %d", rep.Segments, len(segs))
	}
}

func decode(tb testing.TB, line []byte) audit.Record {
	tb.Helper()
	var r audit.Record
	if err := json.Unmarshal(line, &r); err != nil {
		tb.Fatalf("%s: %v", line, err)
	}
	return r
}

func TestCheckpointTriggers(t *testing.T) {
	t.Run("count", func(t *testing.T) {
		dir := t.TempDir()
		l := start(t, audit.Config{Dir: dir, Signer: newSigner(t, "ecdsa-p256"), CheckpointEvery: 5})
		for i := range 12 {
			mustAppend(t, l, gen(i))
		}
		cps := all(t, l, audit.Filter{Kinds: []audit.Kind{audit.KindCheckpoint}})
		if got := seqs(cps); !slices.Equal(got, []uint64{6, 12}) {
			t.Errorf("checkpoints at %v, want after every 5 records: [6 12]", got)
		}
		for _, cp := range cps {
			if err := audit.VerifyCheckpoint(cp, nil); err != nil {
				t.Error(err)
			}
		}
		assertHead(t, dir, cps[len(cps)-1])
	})
	t.Run("interval", func(t *testing.T) {
		dir := t.TempDir()
		clock := clockwork.NewFakeClockAt(fixtureStart)
		l := start(t, audit.Config{Dir: dir, Signer: newSigner(t, "ecdsa-p256"), CheckpointEvery: -1,
			CheckpointInterval: time.Minute, Clock: clock})
		for i := range 3 {
			mustAppend(t, l, gen(i))
		}
		if cps := all(t, l, audit.Filter{Kinds: []audit.Kind{audit.KindCheckpoint}}); len(cps) != 0 {
			t.Fatalf("checkpoint before the interval passed: %v", seqs(cps))
		}
		clock.Advance(time.Minute)
		cp := waitForCheckpoint(t, l, 4)
		if !cp.Time.Equal(fixtureStart.Add(time.Minute)) || cp.Head != all(t, l, audit.Filter{Limit: 3})[2].Hash {
			t.Errorf("checkpoint %+v, want one at %v over record 3", cp, fixtureStart.Add(time.Minute))
		}
		assertHead(t, dir, cp)

		// An idle ledger signs nothing new, and a record after the pause
		// gets its own full interval.
		clock.Advance(5 * time.Minute)
		mustAppend(t, l, gen(3))
		if got := seqs(all(t, l, audit.Filter{Kinds: []audit.Kind{audit.KindCheckpoint}})); !slices.Equal(got, []uint64{4}) {
			t.Errorf("checkpoints %v, want only [4]", got)
		}
		clock.Advance(time.Minute)
		waitForCheckpoint(t, l, 6)
	})
}

func waitForCheckpoint(t *testing.T, l *audit.Ledger, seq uint64) audit.Record {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, cp := range all(t, l, audit.Filter{Kinds: []audit.Kind{audit.KindCheckpoint}}) {
			if cp.Seq == seq {
				return cp
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no checkpoint at seq %d", seq)
	return audit.Record{}
}

func assertHead(t *testing.T, dir string, cp audit.Record) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	want := fmt.Sprintf(`"seq": %d,`, cp.Seq)
	for {
		b, err := os.ReadFile(filepath.Join(dir, "head.json"))
		if err == nil && bytes.Contains(b, []byte(want)) && bytes.Contains(b, []byte(cp.Hash)) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("head.json = %s (%v), want checkpoint seq %d hash %s", b, err, cp.Seq, cp.Hash)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestSignerFailure(t *testing.T) {
	signer := newSigner(t, "ecdsa-p256")
	signer.fail.Store(true)
	reg := prometheus.NewRegistry()
	clock := clockwork.NewFakeClockAt(fixtureStart)
	l := start(t, audit.Config{Dir: t.TempDir(), Signer: signer, CheckpointEvery: 2, CheckpointInterval: -1,
		Metrics: reg, Clock: clock})
	for i := range 5 {
		mustAppend(t, l, gen(i))
	}
	if cps := all(t, l, audit.Filter{Kinds: []audit.Kind{audit.KindCheckpoint}}); len(cps) != 0 {
		t.Fatalf("checkpoints written by a failing signer: %v", seqs(cps))
	}
	// One attempt, then none until the retry delay has passed.
	if got := signer.calls.Load(); got != 1 {
		t.Errorf("signer called %d times for 5 appends, want 1", got)
	}
	if got := counter(t, reg, "meshca_audit_checkpoint_errors_total"); got != 1 {
		t.Errorf("signing failures counted %v, want 1", got)
	}
	signer.fail.Store(false)
	mustAppend(t, l, gen(5))
	if cps := all(t, l, audit.Filter{Kinds: []audit.Kind{audit.KindCheckpoint}}); len(cps) != 0 {
		t.Fatalf("signing retried before the delay: %v", seqs(cps))
	}
	clock.Advance(5 * time.Second)
	mustAppend(t, l, gen(6))
	if got := seqs(all(t, l, audit.Filter{Kinds: []audit.Kind{audit.KindCheckpoint}})); !slices.Equal(got, []uint64{8}) {
		t.Errorf("checkpoints %v once the signer is back, want [8]", got)
	}
	mustVerify(t, l)
}

// mirrorSink checks that every line it gets is already on disk.
type mirrorSink struct {
	t    *testing.T
	dir  string
	mu   sync.Mutex
	buf  bytes.Buffer
	fail bool
}

func (m *mirrorSink) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var disk []byte
	for _, path := range segments(m.t, m.dir) {
		b, err := os.ReadFile(path)
		if err != nil {
			m.t.Error(err)
		}
		disk = append(disk, b...)
	}
	if !bytes.HasSuffix(disk, p) {
		m.t.Errorf("mirror got records not yet on disk:\n%s", p)
	}
	if m.fail {
		return 0, errors.New("mirror broken")
	}
	return m.buf.Write(p)
}

func TestMirror(t *testing.T) {
	dir := t.TempDir()
	sink := &mirrorSink{t: t, dir: dir}
	l := start(t, audit.Config{Dir: dir, Mirror: sink, Signer: newSigner(t, "ecdsa-p256"), CheckpointEvery: 4})
	var wg sync.WaitGroup
	for i := range 30 {
		wg.Go(func() { tryAppend(t, l, gen(i)) })
	}
	wg.Wait()
	l.Close()
	disk, err := os.ReadFile(segments(t, dir)[0])
	if err != nil {
		t.Fatal(err)
	}
	sink.mu.Lock()
	defer sink.mu.Unlock()
	if !bytes.Equal(sink.buf.Bytes(), disk) {
		t.Errorf("mirror got\n%s\nthe ledger holds\n%s", sink.buf.Bytes(), disk)
	}
}

func TestMirrorFailureDoesNotFailAppends(t *testing.T) {
	dir := t.TempDir()
	reg := prometheus.NewRegistry()
	l := start(t, audit.Config{Dir: dir, Mirror: &mirrorSink{t: t, dir: dir, fail: true}, Metrics: reg})
	for i := range 3 {
		mustAppend(t, l, gen(i))
	}
	l.Close() // the mirror is written after the appends are answered
	if got := counter(t, reg, "meshca_audit_mirror_errors_total"); got != 3 {
		t.Errorf("mirror errors counted %v, want 3", got)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	l := start(t, audit.Config{Dir: t.TempDir(), Metrics: reg, Signer: newSigner(t, "ecdsa-p256"), CheckpointEvery: 10})
	for i := range 20 {
		mustAppend(t, l, gen(i))
	}
	l.Close() // metrics are updated as the appends are answered
	want := map[string]float64{"issued": 14, "denied": 4, "admin": 2, "checkpoint": 2}
	for kind, n := range want {
		if got := counterWith(t, reg, "meshca_audit_records_total", "kind", kind); got != n {
			t.Errorf("records_total{kind=%q} = %v, want %v", kind, got, n)
		}
	}
	if c, _ := histogram(t, reg, "meshca_audit_batch_duration_seconds"); c != 20 {
		t.Errorf("batch latency observed %v times, want 20 (sequential appends)", c)
	}
}

func counter(t *testing.T, reg *prometheus.Registry, name string) float64 {
	return counterWith(t, reg, name, "", "")
}

func counterWith(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label == "" {
				return m.GetCounter().GetValue()
			}
			for _, lp := range m.GetLabel() {
				if lp.GetName() == label && lp.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

func histogram(tb testing.TB, reg *prometheus.Registry, name string) (count, sum float64) {
	tb.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			h := mf.GetMetric()[0].GetHistogram()
			return float64(h.GetSampleCount()), h.GetSampleSum()
		}
	}
	return 0, 0
}
