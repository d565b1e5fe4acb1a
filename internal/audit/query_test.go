package audit_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/meshca/meshca/internal/audit"
)

// TestLedger100k checks every filter, Stats and Export against expectations
// computed from the generator alone, on 100,000 records.
func TestLedger100k(t *testing.T) {
	dir := bigLedger(t)
	t.Logf("built the 100k ledger in %v", bigLedgerState.built)
	began := time.Now()
	l, err := audit.OpenReadOnly(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("opened it in %v", time.Since(began))

	began = time.Now()
	rep := mustVerify(t, l)
	t.Logf("verified it in %v: %+v", time.Since(began), rep)
	if got := rep.Records - rep.Checkpoints; got != bigRecords {
		t.Fatalf("ledger holds %d records besides checkpoints, want %d", got, bigRecords)
	}
	// Never more than 1000 records without a checkpoint.
	last := uint64(0)
	for _, cp := range all(t, l, audit.Filter{Kinds: []audit.Kind{audit.KindCheckpoint}}) {
		if cp.Seq-last-1 > audit.DefaultCheckpointEvery {
			t.Errorf("%d records between the checkpoints at %d and %d", cp.Seq-last-1, last, cp.Seq)
		}
		last = cp.Seq
	}
	if rep.Checkpoints < bigRecords/audit.DefaultCheckpointEvery {
		t.Errorf("%d checkpoints for %d records", rep.Checkpoints, bigRecords)
	}

	gens := make([]audit.Record, bigRecords)
	for i := range gens {
		gens[i] = gen(i)
	}
	id := genSPIFFEID(107)
	validAt := fixtureStart.Add(30 * time.Minute)
	validAt2 := fixtureStart.Add(700*time.Minute + 30*time.Second)
	issuedValid := func(g audit.Record, at time.Time) bool {
		return g.Kind == audit.KindIssued && !at.Before(g.NotBefore) && at.Before(g.NotAfter)
	}
	for _, tt := range []struct {
		name string
		f    audit.Filter
		want func(i int, g audit.Record) bool
		// Time filters select checkpoints too, which the generator knows
		// nothing about; they are checked against the window instead.
		checkpoints bool
	}{
		{"SPIFFE ID", audit.Filter{SPIFFEID: id},
			func(_ int, g audit.Record) bool { return g.SPIFFEID == id || g.ClaimedID == id }, false},
		{"namespace", audit.Filter{Namespace: "ns-3"},
			func(_ int, g audit.Record) bool { return g.Namespace == "ns-3" }, false},
		{"serial", audit.Filter{Serial: gen(12345).Serial},
			func(i int, _ audit.Record) bool { return i == 12345 }, false},
		{"serial in upper case", audit.Filter{Serial: strings.ToUpper(gen(99990).Serial)},
			func(i int, _ audit.Record) bool { return i == 99990 }, false},
		{"serial of nothing", audit.Filter{Serial: "ffffffffffff"},
			func(int, audit.Record) bool { return false }, false},
		{"serial and a namespace it does not have", audit.Filter{Serial: gen(12345).Serial, Namespace: "ns-0"},
			func(int, audit.Record) bool { return false }, false},
		{"since and until", audit.Filter{Since: phaseTime(3), Until: phaseTime(5)},
			func(i int, _ audit.Record) bool { return phaseOf(i) >= 3 && phaseOf(i) < 5 }, true},
		{"since", audit.Filter{Since: phaseTime(9).Add(-time.Second)},
			func(i int, _ audit.Record) bool { return phaseOf(i) >= 9 }, true},
		{"until", audit.Filter{Until: phaseTime(1)},
			func(i int, _ audit.Record) bool { return phaseOf(i) == 0 }, true},
		{"denied, late", audit.Filter{Denied: true, Since: phaseTime(7)},
			func(i int, g audit.Record) bool { return g.Kind == audit.KindDenied && phaseOf(i) >= 7 }, false},
		{"denied claiming an ID, in a window", audit.Filter{Denied: true, SPIFFEID: id, Since: phaseTime(5)},
			func(i int, g audit.Record) bool {
				return g.Kind == audit.KindDenied && g.ClaimedID == id && phaseOf(i) >= 5
			}, false},
		{"valid at", audit.Filter{ValidAt: validAt},
			func(_ int, g audit.Record) bool { return issuedValid(g, validAt) }, false},
		{"admin", audit.Filter{Kinds: []audit.Kind{audit.KindAdmin}},
			func(_ int, g audit.Record) bool { return g.Kind == audit.KindAdmin }, false},
		{"everything but issuances, early", audit.Filter{Kinds: []audit.Kind{audit.KindAdmin, audit.KindDenied}, Until: phaseTime(2)},
			func(i int, g audit.Record) bool { return g.Kind != audit.KindIssued && phaseOf(i) < 2 }, false},
		{"combined", audit.Filter{Namespace: "ns-3", ValidAt: validAt2, Since: phaseTime(2), Until: phaseTime(9)},
			func(i int, g audit.Record) bool {
				return g.Namespace == "ns-3" && issuedValid(g, validAt2) && phaseOf(i) >= 2 && phaseOf(i) < 9
			}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := all(t, l, tt.f)
			var wantN int
			want := make(map[int]bool)
			for i, g := range gens {
				if tt.want(i, g) {
					want[i] = true
					wantN++
				}
			}
			seen := make(map[int]bool)
			for k, r := range got {
				if k > 0 && r.Seq <= got[k-1].Seq {
					t.Fatalf("records out of order: seq %d after %d", r.Seq, got[k-1].Seq)
				}
				if r.Kind == audit.KindCheckpoint && tt.checkpoints {
					if r.Time.Before(tt.f.Since) || !tt.f.Until.IsZero() && !r.Time.Before(tt.f.Until) {
						t.Errorf("checkpoint %d at %v is outside the window", r.Seq, r.Time)
					}
					continue
				}
				i := genID(r)
				switch {
				case i < 0:
					t.Fatalf("unexpected record %+v", r)
				case !want[i]:
					t.Errorf("record %d (seq %d) does not match", i, r.Seq)
				case seen[i]:
					t.Errorf("record %d returned twice", i)
				}
				seen[i] = true
			}
			if len(seen) != wantN {
				t.Errorf("%d records, want %d", len(seen), wantN)
			}
			if wantN < 2 {
				return
			}
			// A limit returns a prefix.
			limited := tt.f
			limited.Limit = 2
			if got2 := all(t, l, limited); !slices.Equal(seqs(got2), seqs(got[:2])) {
				t.Errorf("limit 2 returned %v, want %v", seqs(got2), seqs(got[:2]))
			}
		})
	}

	t.Run("checkpoints", func(t *testing.T) {
		cps := all(t, l, audit.Filter{Kinds: []audit.Kind{audit.KindCheckpoint}})
		if len(cps) != rep.Checkpoints || cps[len(cps)-1].Seq != rep.LastCheckpointSeq {
			t.Errorf("%d checkpoints ending at %d, Verify saw %d ending at %d",
				len(cps), cps[len(cps)-1].Seq, rep.Checkpoints, rep.LastCheckpointSeq)
		}
	})

	t.Run("stats", func(t *testing.T) {
		at := fixtureStart.Add(600 * time.Minute)
		st, err := l.Stats(t.Context(), at)
		if err != nil {
			t.Fatal(err)
		}
		issued, denied, valid := map[string]int{}, map[string]int{}, map[string]int{}
		for _, g := range gens {
			switch g.Kind {
			case audit.KindIssued:
				issued[g.SPIFFEID]++
				if issuedValid(g, at) {
					valid[g.RootFingerprint]++
				}
			case audit.KindDenied:
				denied[g.Reason]++
			}
		}
		if !maps.Equal(st.Issued, issued) || !maps.Equal(st.Denied, denied) || !maps.Equal(st.ValidByRoot, valid) {
			t.Errorf("Stats = denied %v, valid %v (%d IDs); want denied %v, valid %v (%d IDs)",
				st.Denied, st.ValidByRoot, len(st.Issued), denied, valid, len(issued))
		}
		if len(valid) != len(genRoots) {
			t.Fatalf("the test should have live leaves under every root, has %v", valid)
		}
	})

	t.Run("export", func(t *testing.T) {
		exported := sha256.New()
		n, err := l.Export(t.Context(), exported, audit.Filter{})
		if err != nil {
			t.Fatal(err)
		}
		stored := sha256.New()
		for _, s := range segments(t, dir) {
			f, err := os.Open(s)
			if err != nil {
				t.Fatal(err)
			}
			_, err = io.Copy(stored, f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
		}
		if n != rep.Records || !bytes.Equal(exported.Sum(nil), stored.Sum(nil)) {
			t.Errorf("export of %d records differs from the %d records on disk", n, rep.Records)
		}
		var buf bytes.Buffer
		if n, err := l.Export(t.Context(), &buf, audit.Filter{Denied: true, Until: phaseTime(1)}); err != nil || n != 2000 ||
			bytes.Count(buf.Bytes(), []byte("\n")) != n {
			t.Errorf("export of phase 0 denials = %d records, %v; want 2000 lines", n, err)
		}
	})
}

func TestQueryStopsEarly(t *testing.T) {
	l := start(t, audit.Config{Dir: t.TempDir()})
	for i := range 10 {
		mustAppend(t, l, gen(i))
	}
	n := 0
	for _, err := range l.Query(t.Context(), audit.Filter{}) {
		if err != nil {
			t.Fatal(err)
		}
		if n++; n == 3 {
			break
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	for _, err := range l.Query(ctx, audit.Filter{}) {
		if err == nil {
			t.Fatal("query with a cancelled context returned records")
		}
		if !errors.Is(err, context.Canceled) {
			t.Errorf("query error %v, want context.Canceled", err)
		}
	}
}

func TestMergeQuery(t *testing.T) {
	// Two replicas whose records interleave in time.
	clocks := []*clockwork.FakeClock{clockwork.NewFakeClockAt(fixtureStart), clockwork.NewFakeClockAt(fixtureStart)}
	var ledgers []*audit.Ledger
	for _, c := range clocks {
		ledgers = append(ledgers, start(t, audit.Config{Dir: t.TempDir(), Clock: c}))
	}
	type key struct {
		ledger int
		id     int
	}
	var want []key
	for i := range 30 {
		replica := i % 3 % 2 // 0, 1, 0, 0, 1, 0, ...
		clocks[replica].Advance(time.Duration(i+1)*time.Minute - clocks[replica].Since(fixtureStart))
		mustAppend(t, ledgers[replica], gen(i))
		want = append(want, key{replica, i})
	}
	var got []key
	for m, err := range audit.MergeQuery(t.Context(), ledgers, audit.Filter{}) {
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, key{m.Ledger, genID(m.Record)})
	}
	if !slices.Equal(got, want) {
		t.Errorf("merged order %v, want %v", got, want)
	}
	got = got[:0]
	for m, err := range audit.MergeQuery(t.Context(), ledgers, audit.Filter{Denied: true, Limit: 4}) {
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, key{m.Ledger, genID(m.Record)})
	}
	var wantDenied []key
	for _, k := range want {
		if gen(k.id).Kind == audit.KindDenied && len(wantDenied) < 4 {
			wantDenied = append(wantDenied, k)
		}
	}
	if !slices.Equal(got, wantDenied) {
		t.Errorf("merged denials %v, want %v", got, wantDenied)
	}
}

func TestOpenReadOnly(t *testing.T) {
	dir := t.TempDir()
	l := start(t, audit.Config{Dir: dir})
	mustAppend(t, l, gen(0))

	ro, err := audit.OpenReadOnly(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ro.Append(t.Context(), gen(1)); !errors.Is(err, audit.ErrReadOnly) {
		t.Errorf("Append on a read-only ledger = %v, want ErrReadOnly", err)
	}
	if _, err := ro.Prune(time.Now()); !errors.Is(err, audit.ErrReadOnly) {
		t.Errorf("Prune on a read-only ledger = %v, want ErrReadOnly", err)
	}
	if err := ro.Run(t.Context()); !errors.Is(err, audit.ErrReadOnly) {
		t.Errorf("Run on a read-only ledger = %v, want ErrReadOnly", err)
	}
	// It sees the ledger as of opening.
	mustAppend(t, l, gen(1))
	if got := all(t, ro, audit.Filter{}); len(got) != 1 {
		t.Errorf("read-only view holds %d records, want the 1 there when it was opened", len(got))
	}
	if _, err := audit.OpenReadOnly(dir + "/missing"); err == nil {
		t.Error("OpenReadOnly of a missing directory succeeded")
	}
}

// TestValidAtOverManySegments: certificates issued a minute apart, each
// valid 20 minutes, over segments of a few records each, so that a ValidAt
// query can skip most segments unread. Whatever it skips, it finds exactly
// the certificates valid at that time, from the writer's index and from
// one rebuilt from the files.
func TestValidAtOverManySegments(t *testing.T) {
	dir := t.TempDir()
	l := start(t, audit.Config{Dir: dir, SegmentBytes: 2 << 10, CheckpointEvery: -1, CheckpointInterval: -1})
	const n = 300
	var recs []audit.Record
	for i := 0; len(recs) < n; i++ {
		r := gen(i)
		if r.Kind != audit.KindIssued {
			continue
		}
		r.NotBefore = fixtureStart.Add(time.Duration(len(recs)) * time.Minute)
		r.NotAfter = r.NotBefore.Add(20 * time.Minute)
		if _, err := l.Append(context.Background(), r); err != nil {
			t.Fatal(err)
		}
		recs = append(recs, r)
	}
	reopened, err := audit.OpenReadOnly(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, at := range []time.Duration{-time.Minute, 0, 10 * time.Minute, 150*time.Minute + 30*time.Second, 299 * time.Minute, 318 * time.Minute, 319 * time.Minute, 10 * time.Hour} {
		validAt := fixtureStart.Add(at)
		var want []string
		for _, r := range recs {
			if !validAt.Before(r.NotBefore) && validAt.Before(r.NotAfter) {
				want = append(want, r.Serial)
			}
		}
		for name, led := range map[string]*audit.Ledger{"writer": l, "reopened": reopened} {
			var got []string
			for _, r := range all(t, led, audit.Filter{ValidAt: validAt}) {
				got = append(got, r.Serial)
			}
			if !slices.Equal(got, want) {
				t.Errorf("%s, valid at +%v: %d certificates %v, want %d %v", name, at, len(got), got, len(want), want)
			}
		}
	}
}
