package audit_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/meshca/meshca/internal/audit"
)

// pruneLedger writes 20 records at fixtureStart, 20 an hour later and 10
// two hours later, into 2 KiB segments that each end with a checkpoint.
func pruneLedger(t *testing.T, signer *testSigner) (string, *audit.Ledger) {
	t.Helper()
	dir := t.TempDir()
	clock := clockwork.NewFakeClockAt(fixtureStart)
	cfg := audit.Config{Dir: dir, Signer: signer, SegmentBytes: 2 << 10, CheckpointEvery: -1,
		CheckpointInterval: -1, Clock: clock}
	l := start(t, cfg)
	for phase, n := range []int{20, 20, 10} {
		for i := range n {
			mustAppend(t, l, gen(phase*100+i))
		}
		clock.Advance(time.Hour)
	}
	return dir, l
}

func TestPrune(t *testing.T) {
	signer := newSigner(t, "ecdsa-p256")
	dir, l := pruneLedger(t, signer)
	before := all(t, l, audit.Filter{})
	segsBefore := segments(t, dir)
	cutoff := fixtureStart.Add(30 * time.Minute)

	removed, err := l.Prune(cutoff)
	if err != nil {
		t.Fatal(err)
	}
	if removed == 0 {
		t.Fatal("Prune removed nothing")
	}
	through := uint64(removed)
	if cp := before[through-1]; cp.Kind != audit.KindCheckpoint || !cp.Time.Before(cutoff) {
		t.Errorf("pruned through seq %d, a %s at %v; want an old checkpoint", through, cp.Kind, cp.Time)
	}
	// The first kept segment holds something new enough, or is the active
	// one: Prune went as far as it could.
	firsts := segmentFirsts(t, segsBefore)
	for i, f := range firsts[:len(firsts)-1] {
		if f != through+1 {
			continue
		}
		newest := before[firsts[i+1]-2].Time // the segment's last record
		if newest.Before(cutoff) {
			t.Errorf("segment %d-%d holds only records older than the cutoff but was kept", f, firsts[i+1]-1)
		}
	}
	after := all(t, l, audit.Filter{})
	if len(after) == 0 || after[0].Seq != through+1 || len(after) != len(before)-removed {
		t.Fatalf("after pruning through %d the ledger holds seqs %d.., %d records; want %d.., %d",
			through, after[0].Seq, len(after), through+1, len(before)-removed)
	}
	for _, r := range before {
		if r.Time.Before(cutoff) {
			continue
		}
		if r.Seq <= through {
			t.Errorf("seq %d at %v is newer than the cutoff but was pruned", r.Seq, r.Time)
		}
	}
	rep := mustVerify(t, l)
	if rep.PrunedThrough != through || rep.FirstSeq != through+1 {
		t.Errorf("report %+v, want pruned through %d", rep, through)
	}
	for i, s := range segsBefore {
		if gone := !exists(t, s); gone != (firsts[i] <= through) {
			t.Errorf("segment %s: removed=%v, pruned through %d", filepath.Base(s), gone, through)
		}
	}

	// The serial index forgot pruned records.
	for _, r := range []audit.Record{before[0], after[len(after)-3]} {
		if r.Kind != audit.KindIssued {
			continue
		}
		got := all(t, l, audit.Filter{Serial: r.Serial})
		if want := r.Seq > through; (len(got) == 1) != want {
			t.Errorf("serial of seq %d found %d times after pruning through %d", r.Seq, len(got), through)
		}
	}

	if n, err := l.Prune(cutoff); err != nil || n != 0 {
		t.Errorf("second Prune = %d, %v; want nothing more", n, err)
	}
	l.Close()

	// Reopened, it continues the chain and prunes on.
	l = start(t, audit.Config{Dir: dir, Signer: signer, SegmentBytes: 2 << 10})
	if r := mustAppend(t, l, gen(999)); r.Seq != before[len(before)-1].Seq+1 {
		t.Errorf("append after reopening got seq %d, want %d", r.Seq, before[len(before)-1].Seq+1)
	}
	if _, err := l.Prune(fixtureStart.Add(10 * time.Hour)); err != nil {
		t.Fatal(err)
	}
	if rep := mustVerify(t, l); rep.Segments != 1 {
		t.Errorf("pruning everything left %d segments, want the active one", rep.Segments)
	}
}

// segmentFirsts reads the first seq of each segment from its name.
func segmentFirsts(t *testing.T, segs []string) []uint64 {
	t.Helper()
	var out []uint64
	for _, s := range segs {
		var first uint64
		if _, err := fmt.Sscanf(filepath.Base(s), "seg-%d.log", &first); err != nil {
			t.Fatal(err)
		}
		out = append(out, first)
	}
	return out
}

func exists(t *testing.T, path string) bool {
	t.Helper()
	_, err := os.Stat(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	return err == nil
}

func TestPruneNeedsCheckpoints(t *testing.T) {
	dir := t.TempDir()
	l := start(t, audit.Config{Dir: dir, SegmentBytes: 1 << 10})
	for i := range 20 {
		mustAppend(t, l, gen(i))
	}
	if n, err := l.Prune(time.Now().Add(time.Hour)); n != 0 || err != nil {
		t.Errorf("Prune without checkpoints = %d, %v; want nothing pruned", n, err)
	}
	if exists(t, filepath.Join(dir, "prune.json")) {
		t.Error("prune.json written")
	}
}

func TestPruneStateTampering(t *testing.T) {
	signer := newSigner(t, "ecdsa-p256")
	editCheckpoint := func(edit func(cp map[string]any)) func(st map[string]any) {
		return func(st map[string]any) { edit(st["checkpoint"].(map[string]any)) }
	}
	for _, tt := range []struct {
		name string
		edit func(st map[string]any) // nil: delete the file
	}{
		{"through_seq", func(st map[string]any) { st["through_seq"] = st["through_seq"].(float64) + 1 }},
		{"through_hash", func(st map[string]any) { st["through_hash"] = zeros(64) }},
		{"checkpoint head", editCheckpoint(func(cp map[string]any) { cp["head"] = zeros(64) })},
		{"checkpoint seq", editCheckpoint(func(cp map[string]any) { cp["seq"] = cp["seq"].(float64) - 1 })},
		{"checkpoint signature", editCheckpoint(func(cp map[string]any) { cp["signature"] = "AAAA" })},
		{"checkpoint removed", func(st map[string]any) { delete(st, "checkpoint") }},
		{"file deleted", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir, l := pruneLedger(t, signer)
			if n, err := l.Prune(fixtureStart.Add(90 * time.Minute)); n == 0 || err != nil {
				t.Fatalf("Prune = %d, %v", n, err)
			}
			l.Close()
			path := filepath.Join(dir, "prune.json")
			if tt.edit == nil {
				if err := os.Remove(path); err != nil {
					t.Fatal(err)
				}
			} else {
				var st map[string]any
				if err := json.Unmarshal(readFile(t, path), &st); err != nil {
					t.Fatal(err)
				}
				tt.edit(st)
				b, err := json.Marshal(st)
				if err != nil {
					t.Fatal(err)
				}
				writeFile(t, path, b)
			}

			ro, err := audit.OpenReadOnly(dir)
			if err != nil {
				t.Fatal(err)
			}
			rep, err := ro.Verify(t.Context(), audit.VerifyOptions{})
			if !errors.Is(err, audit.ErrTampered) {
				t.Fatalf("Verify = %v, want ErrTampered", err)
			}
			wantSeg := "prune.json"
			if tt.edit == nil {
				wantSeg = filepath.Base(segments(t, dir)[0])
			}
			if rep.Failure.Segment != wantSeg {
				t.Errorf("failure %s, want it in %s", rep.Failure, wantSeg)
			}
			if tt.edit != nil {
				if _, err := audit.New(audit.Config{Dir: dir}); !errors.Is(err, audit.ErrCorrupt) {
					t.Errorf("New with a tampered prune.json = %v, want ErrCorrupt", err)
				}
			}
		})
	}
}

func zeros(n int) string { return string(bytes.Repeat([]byte("0"), n)) }

// TestPruneWhileReading: a query that started before Prune sees the
// segments it started with; their files go when it finishes.
func TestPruneWhileReading(t *testing.T) {
	dir, l := pruneLedger(t, newSigner(t, "ecdsa-p256"))
	want := len(all(t, l, audit.Filter{}))
	first := filepath.Join(dir, segFile(1))
	n := 0
	for _, err := range l.Query(t.Context(), audit.Filter{}) {
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			if removed, err := l.Prune(fixtureStart.Add(90 * time.Minute)); removed == 0 || err != nil {
				t.Fatalf("Prune = %d, %v", removed, err)
			}
			if !exists(t, first) {
				t.Error("a segment being read was deleted")
			}
		}
		n++
	}
	if n != want {
		t.Errorf("query read %d records across the prune, want %d", n, want)
	}
	if exists(t, first) {
		t.Error("pruned segment still on disk after the last reader finished")
	}
}
