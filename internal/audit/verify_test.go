package audit_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/internal/audit"
)

func segFile(first uint64) string { return fmt.Sprintf("seg-%020d.log", first) }

// tamperLedger is one segment: records 1-10, checkpoint 11, records 12-21,
// checkpoint 22, ... checkpoint 44 (named in head.json), records 45-47. Line
// n holds seq n.
func tamperLedger(t *testing.T, signer *testSigner) string {
	t.Helper()
	dir := t.TempDir()
	l := start(t, audit.Config{Dir: dir, Signer: signer, CheckpointEvery: 10, CheckpointInterval: -1})
	for i := range 43 {
		mustAppend(t, l, gen(i))
	}
	l.Close()
	return dir
}

func encode(t *testing.T, r audit.Record) []byte {
	t.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rehash recomputes the hash of r, as someone who knows the format can.
func rehash(t *testing.T, r *audit.Record) {
	t.Helper()
	canon, err := r.Canonical()
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(canon)
	r.Hash = hex.EncodeToString(sum[:])
}

// rechain rewrites lines from index i on into a consistent chain: what an
// attacker without the signing key can do at best.
func rechain(t *testing.T, ls [][]byte, i int) {
	t.Helper()
	prev := decode(t, ls[i-1]).Hash
	for ; i < len(ls); i++ {
		r := decode(t, ls[i])
		r.Prev = prev
		if r.Kind == audit.KindCheckpoint {
			r.Head = prev
		}
		rehash(t, &r)
		ls[i] = encode(t, r)
		prev = r.Hash
	}
}

// editLines applies edit to the lines of one segment.
func editLines(t *testing.T, path string, edit func(ls [][]byte) [][]byte) {
	t.Helper()
	writeLines(t, path, edit(lines(t, path)))
}

func TestVerifyDetectsTampering(t *testing.T) {
	signer := newSigner(t, "ecdsa-p256")
	other := newSigner(t, "ecdsa-p256")
	seg := segFile(1)
	edit := func(edit func(t *testing.T, ls [][]byte) [][]byte) func(*testing.T, string) {
		return func(t *testing.T, dir string) {
			editLines(t, filepath.Join(dir, seg), func(ls [][]byte) [][]byte { return edit(t, ls) })
		}
	}
	// Line 20 (index 19) is seq 20, a denial (gen(18)).
	for _, tt := range []struct {
		name    string
		tamper  func(t *testing.T, dir string)
		roots   []*x509.Certificate
		want    *audit.Failure // nil: Verify cannot tell
		problem string
	}{
		{
			name: "edited field",
			tamper: edit(func(t *testing.T, ls [][]byte) [][]byte {
				r := decode(t, ls[19])
				r.Peer = "192.0.2.1:1234"
				ls[19] = encode(t, r)
				return ls
			}),
			want: &audit.Failure{Segment: seg, Line: 20, Seq: 20, Found: 20}, problem: "hash mismatch",
		},
		{
			name: "edited and rehashed",
			tamper: edit(func(t *testing.T, ls [][]byte) [][]byte {
				r := decode(t, ls[19])
				r.Reason = "none"
				rehash(t, &r)
				ls[19] = encode(t, r)
				return ls
			}),
			want: &audit.Failure{Segment: seg, Line: 21, Seq: 21, Found: 21}, problem: "prev",
		},
		{
			name: "edited and the rest of the chain rewritten",
			tamper: edit(func(t *testing.T, ls [][]byte) [][]byte {
				r := decode(t, ls[19])
				r.Reason = "none"
				ls[19] = encode(t, r)
				rechain(t, ls, 19)
				return ls
			}),
			// The next checkpoint's signature covers the old head.
			want: &audit.Failure{Segment: seg, Line: 22, Seq: 22, Found: 22}, problem: "signature does not verify",
		},
		{
			name:   "deleted record",
			tamper: edit(func(_ *testing.T, ls [][]byte) [][]byte { return append(ls[:19], ls[20:]...) }),
			want:   &audit.Failure{Segment: seg, Line: 20, Seq: 20, Found: 21}, problem: "seq 21, want 20",
		},
		{
			name: "deleted record, rest rechained",
			tamper: edit(func(t *testing.T, ls [][]byte) [][]byte {
				ls = append(ls[:19], ls[20:]...)
				for i := 19; i < len(ls); i++ {
					r := decode(t, ls[i])
					r.Seq--
					ls[i] = encode(t, r)
				}
				rechain(t, ls, 19)
				return ls
			}),
			want: &audit.Failure{Segment: seg, Line: 21, Seq: 21, Found: 21}, problem: "signature does not verify",
		},
		{
			name: "swapped pair",
			tamper: edit(func(_ *testing.T, ls [][]byte) [][]byte {
				ls[19], ls[20] = ls[20], ls[19]
				return ls
			}),
			want: &audit.Failure{Segment: seg, Line: 20, Seq: 20, Found: 21}, problem: "seq 21, want 20",
		},
		{
			name:   "duplicated record",
			tamper: edit(func(_ *testing.T, ls [][]byte) [][]byte { return append(ls[:20], ls[19:]...) }),
			want:   &audit.Failure{Segment: seg, Line: 21, Seq: 21, Found: 20}, problem: "seq 20, want 21",
		},
		{
			name: "spacing changed",
			tamper: edit(func(_ *testing.T, ls [][]byte) [][]byte {
				ls[19] = bytes.Replace(ls[19], []byte(`,"kind"`), []byte(`, "kind"`), 1)
				return ls
			}),
			want: &audit.Failure{Segment: seg, Line: 20, Seq: 20, Found: 20}, problem: "canonical",
		},
		{
			name: "field added",
			tamper: edit(func(_ *testing.T, ls [][]byte) [][]byte {
				ls[19] = bytes.Replace(ls[19], []byte(`{`), []byte(`{"approved":true,`), 1)
				return ls
			}),
			want: &audit.Failure{Segment: seg, Line: 20, Seq: 20, Found: 20}, problem: "canonical",
		},
		{
			name: "garbage line",
			tamper: edit(func(_ *testing.T, ls [][]byte) [][]byte {
				ls[19] = []byte("not json")
				return ls
			}),
			want: &audit.Failure{Segment: seg, Line: 20, Seq: 20}, problem: "not a valid record",
		},
		{
			name: "time moved back, chain rewritten",
			tamper: edit(func(t *testing.T, ls [][]byte) [][]byte {
				r := decode(t, ls[19])
				r.Time = r.Time.Add(-time.Hour)
				ls[19] = encode(t, r)
				rechain(t, ls, 19)
				return ls
			}),
			want: &audit.Failure{Segment: seg, Line: 20, Seq: 20, Found: 20}, problem: "before the previous record",
		},
		{
			name: "checkpoint signature damaged",
			tamper: edit(func(t *testing.T, ls [][]byte) [][]byte {
				r := decode(t, ls[21])
				r.Signature[len(r.Signature)/2] ^= 1
				ls[21] = encode(t, r)
				rechain(t, ls, 21)
				return ls
			}),
			want: &audit.Failure{Segment: seg, Line: 22, Seq: 22, Found: 22}, problem: "signature does not verify",
		},
		{
			name: "checkpoint forged with another key",
			tamper: edit(func(t *testing.T, ls [][]byte) [][]byte {
				r := decode(t, ls[21])
				sig, chain, err := other.SignCheckpoint(t.Context(), audit.CheckpointDigest(r.Head, 21))
				if err != nil {
					t.Fatal(err)
				}
				r.Signature, r.SignerChain = sig, [][]byte{chain[0].Raw}
				ls[21] = encode(t, r)
				rechain(t, ls, 21)
				return ls
			}),
			roots: []*x509.Certificate{signer.cert},
			want:  &audit.Failure{Segment: seg, Line: 22, Seq: 22, Found: 22}, problem: "checkpoint signer",
		},
		{
			name: "checkpoint forged with another key, no roots",
			tamper: edit(func(t *testing.T, ls [][]byte) [][]byte {
				r := decode(t, ls[43])
				sig, chain, err := other.SignCheckpoint(t.Context(), audit.CheckpointDigest(r.Head, 43))
				if err != nil {
					t.Fatal(err)
				}
				r.Signature, r.SignerChain = sig, [][]byte{chain[0].Raw}
				ls[43] = encode(t, r)
				rechain(t, ls, 43)
				return ls
			}),
			// The forgery verifies on its own; head.json still has the
			// real checkpoint's hash.
			want: &audit.Failure{Segment: seg, Line: 44, Seq: 44, Found: 44}, problem: "head.json",
		},
		{
			name:   "truncated into the last checkpoint",
			tamper: edit(func(_ *testing.T, ls [][]byte) [][]byte { return ls[:39] }),
			want:   &audit.Failure{Segment: seg, Line: 40, Seq: 40}, problem: "cut off",
		},
		{
			name:   "truncated right before the last checkpoint",
			tamper: edit(func(_ *testing.T, ls [][]byte) [][]byte { return ls[:43] }),
			want:   &audit.Failure{Segment: seg, Line: 44, Seq: 44}, problem: "cut off",
		},
		{
			// The documented limit: records after the last checkpoint.
			name:   "truncated after the last checkpoint",
			tamper: edit(func(_ *testing.T, ls [][]byte) [][]byte { return ls[:44] }),
		},
		{
			name: "head.json moved to an older checkpoint's seq",
			tamper: func(t *testing.T, dir string) {
				writeFile(t, filepath.Join(dir, "head.json"),
					bytes.Replace(readFile(t, filepath.Join(dir, "head.json")), []byte(`"seq": 44`), []byte(`"seq": 33`), 1))
			},
			want: &audit.Failure{Segment: seg, Line: 33, Seq: 33, Found: 33}, problem: "head.json",
		},
		{
			name:   "head.json damaged",
			tamper: func(t *testing.T, dir string) { writeFile(t, filepath.Join(dir, "head.json"), []byte("{")) },
			want:   &audit.Failure{Segment: "head.json"}, problem: "corrupt",
		},
		{
			name: "segment renamed",
			tamper: func(t *testing.T, dir string) {
				if err := os.Rename(filepath.Join(dir, seg), filepath.Join(dir, segFile(2))); err != nil {
					t.Fatal(err)
				}
			},
			want: &audit.Failure{Segment: segFile(2), Line: 1, Seq: 1, Found: 1}, problem: "named for seq 2",
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := tamperLedger(t, signer)
			tt.tamper(t, dir)
			ro, err := audit.OpenReadOnly(dir)
			if err != nil {
				t.Fatal(err)
			}
			rep, err := ro.Verify(t.Context(), audit.VerifyOptions{Roots: tt.roots})
			if tt.want == nil {
				if err != nil {
					t.Fatalf("Verify = %v; this tampering is documented as undetectable", err)
				}
				return
			}
			if !errors.Is(err, audit.ErrTampered) {
				t.Fatalf("Verify = %v, want ErrTampered", err)
			}
			got := *rep.Failure
			if !strings.Contains(got.Problem, tt.problem) {
				t.Errorf("problem %q does not mention %q", got.Problem, tt.problem)
			}
			got.Problem = ""
			if got != *tt.want {
				t.Errorf("failure at %+v, want %+v (%s)", got, *tt.want, rep.Failure)
			}
		})
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestVerifyDetectsMissingSegments works on a ledger of many small
// segments, each ending with a checkpoint.
func TestVerifyDetectsMissingSegments(t *testing.T) {
	signer := newSigner(t, "ecdsa-p256")
	build := func(t *testing.T) (string, []string) {
		dir := t.TempDir()
		l := start(t, audit.Config{Dir: dir, Signer: signer, SegmentBytes: 2 << 10, CheckpointEvery: -1, CheckpointInterval: -1})
		for i := range 40 {
			mustAppend(t, l, gen(i))
		}
		l.Close()
		segs := segments(t, dir)
		if len(segs) < 6 {
			t.Fatalf("only %d segments", len(segs))
		}
		return dir, segs
	}
	firstSeq := func(t *testing.T, path string) uint64 { return decode(t, lines(t, path)[0]).Seq }

	t.Run("middle segment", func(t *testing.T) {
		dir, segs := build(t)
		gone := firstSeq(t, segs[2])
		if err := os.Remove(segs[2]); err != nil {
			t.Fatal(err)
		}
		assertFailure(t, dir, audit.Failure{Segment: filepath.Base(segs[3]), Line: 1, Seq: gone, Found: firstSeq(t, segs[3])})
	})
	t.Run("last segments", func(t *testing.T) {
		dir, segs := build(t)
		// head.json names the checkpoint that ends the second-to-last
		// segment; removing that one and the last cuts into it.
		gone := firstSeq(t, segs[len(segs)-2])
		for _, s := range segs[len(segs)-2:] {
			if err := os.Remove(s); err != nil {
				t.Fatal(err)
			}
		}
		prev := segs[len(segs)-3]
		assertFailure(t, dir, audit.Failure{Segment: filepath.Base(prev), Line: len(lines(t, prev)) + 1, Seq: gone})
	})
	t.Run("all segments", func(t *testing.T) {
		dir, segs := build(t)
		for _, s := range segs {
			if err := os.Remove(s); err != nil {
				t.Fatal(err)
			}
		}
		assertFailure(t, dir, audit.Failure{Line: 1, Seq: 1})
	})
}

func assertFailure(t *testing.T, dir string, want audit.Failure) {
	t.Helper()
	ro, err := audit.OpenReadOnly(dir)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := ro.Verify(t.Context(), audit.VerifyOptions{})
	if !errors.Is(err, audit.ErrTampered) {
		t.Fatalf("Verify = %v, want ErrTampered", err)
	}
	got := *rep.Failure
	got.Problem = ""
	if got != want {
		t.Errorf("failure at %+v, want %+v (%s)", got, want, rep.Failure)
	}
}

func TestVerifyCheckpointKeyTypes(t *testing.T) {
	for _, kind := range []string{"ecdsa-p256", "ecdsa-p384", "rsa-pkcs1", "rsa-pss", "ed25519"} {
		t.Run(kind, func(t *testing.T) {
			signer := newSigner(t, kind)
			l := start(t, audit.Config{Dir: t.TempDir(), Signer: signer, CheckpointEvery: 3})
			for i := range 7 {
				mustAppend(t, l, gen(i))
			}
			rep, err := l.Verify(t.Context(), audit.VerifyOptions{Roots: []*x509.Certificate{signer.cert}})
			if err != nil {
				t.Fatal(err)
			}
			if rep.Checkpoints != 2 || rep.LastCheckpointSeq != 8 {
				t.Errorf("report %+v, want checkpoints at 4 and 8", rep)
			}
			// A chain that does not lead to the given roots fails.
			wrong := newSigner(t, "ecdsa-p256")
			rep, err = l.Verify(t.Context(), audit.VerifyOptions{Roots: []*x509.Certificate{wrong.cert}})
			if !errors.Is(err, audit.ErrTampered) || rep.Failure.Seq != 4 {
				t.Errorf("Verify against other roots = %v, want a failure at the first checkpoint, seq 4", err)
			}
		})
	}
}

func TestVerifyCountsFailures(t *testing.T) {
	dir := t.TempDir()
	reg := prometheus.NewRegistry()
	l := start(t, audit.Config{Dir: dir, Metrics: reg})
	for i := range 5 {
		mustAppend(t, l, gen(i))
	}
	l.Close() // Verify still works on a closed ledger
	mustVerify(t, l)
	editLines(t, filepath.Join(dir, segFile(1)), func(ls [][]byte) [][]byte {
		ls[1], ls[2] = ls[2], ls[1]
		return ls
	})
	for range 2 {
		if _, err := l.Verify(t.Context(), audit.VerifyOptions{}); !errors.Is(err, audit.ErrTampered) {
			t.Fatalf("Verify = %v, want ErrTampered", err)
		}
	}
	if got := counter(t, reg, "meshca_audit_verify_failures_total"); got != 2 {
		t.Errorf("verify failures counted %v, want 2", got)
	}
}

func TestVerifyEmpty(t *testing.T) {
	l := start(t, audit.Config{Dir: t.TempDir()})
	rep := mustVerify(t, l)
	if rep != (audit.Report{}) {
		t.Errorf("empty ledger report %+v", rep)
	}
}

func TestVerifyCancelled(t *testing.T) {
	l := start(t, audit.Config{Dir: t.TempDir(), SegmentBytes: 1 << 10})
	for i := range 50 {
		mustAppend(t, l, gen(i))
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	for range 20 { // the pipeline may get some work done first; the answer must not change
		if _, err := l.Verify(ctx, audit.VerifyOptions{}); !errors.Is(err, context.Canceled) || errors.Is(err, audit.ErrTampered) {
			t.Fatalf("Verify with a cancelled context = %v, want context.Canceled", err)
		}
	}
}

// TestNewRefusesCutLedger: a writer must not continue a ledger that lost
// records it had vouched for; numbering on from the cut would bury the
// evidence.
func TestNewRefusesCutLedger(t *testing.T) {
	dir := tamperLedger(t, newSigner(t, "ecdsa-p256"))
	editLines(t, filepath.Join(dir, segFile(1)), func(ls [][]byte) [][]byte { return ls[:40] })
	if _, err := audit.New(audit.Config{Dir: dir}); !errors.Is(err, audit.ErrCorrupt) {
		t.Fatalf("New on a ledger cut before its last checkpoint = %v, want ErrCorrupt", err)
	}
}
