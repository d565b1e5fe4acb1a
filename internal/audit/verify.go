package audit

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"time"
)

// VerifyOptions tunes Verify.
type VerifyOptions struct {
	// Roots, if set, must anchor every checkpoint's signer chain at the
	// checkpoint's time. Without them a checkpoint only proves that the
	// holder of the key in its own chain signed it.
	Roots []*x509.Certificate
}

// Report is what Verify checked and, if it failed, where.
type Report struct {
	Segments    int // segment files read
	Records     int // records checked, checkpoints included
	Checkpoints int // checkpoint signatures verified, the pruning one included
	// FirstSeq and LastSeq bound the records checked; both are 0 when there
	// were none.
	FirstSeq, LastSeq uint64
	// PrunedThrough is the last pruned seq, vouched for by a checkpoint;
	// 0 when nothing was pruned.
	PrunedThrough uint64
	// HeadSeq is the checkpoint head.json says the ledger reaches.
	HeadSeq uint64
	// LastCheckpointSeq is the last signed checkpoint: records after it are
	// chained but not yet signed.
	LastCheckpointSeq uint64
	// Failure is the first broken record, or nil when the ledger verified.
	Failure *Failure
}

// Failure locates the first problem Verify found.
type Failure struct {
	// Segment is the file, a segment or a state file (head.json,
	// prune.json).
	Segment string
	// Line is 1-based within Segment, 0 for state files.
	Line int
	// Seq is the seq the ledger should hold at this point: the first one
	// that cannot be vouched for.
	Seq uint64
	// Found is the seq actually there, 0 when none could be read.
	Found   uint64
	Problem string
}

func (f *Failure) String() string {
	if f.Line == 0 {
		return fmt.Sprintf("%s (seq %d): %s", f.Segment, f.Seq, f.Problem)
	}
	return fmt.Sprintf("%s line %d (seq %d): %s", f.Segment, f.Line, f.Seq, f.Problem)
}

// Verify reads the whole ledger and checks that it is what the writer
// wrote: every line parses and is in canonical form, seqs run on without
// gaps from 1 or the pruned prefix, each prev is the previous record's hash,
// each hash matches its record, times never go back, every checkpoint names
// the record before it and carries a valid signature, and the ledger
// reaches the checkpoint recorded in head.json.
//
// A ledger that fails verification is reported in Report.Failure and as an
// error wrapping ErrTampered; other errors (I/O, ctx) mean Verify could not
// finish.
func (l *Ledger) Verify(ctx context.Context, opts VerifyOptions) (Report, error) {
	v := l.acquire()
	defer l.release()
	rep, err := l.verify(ctx, v, opts)
	if err != nil {
		return rep, err
	}
	if rep.Failure != nil {
		l.metrics.verifyFailures.Inc()
		return rep, fmt.Errorf("%w: %s", ErrTampered, rep.Failure)
	}
	return rep, nil
}

func (l *Ledger) verify(ctx context.Context, v view, opts VerifyOptions) (Report, error) {
	var rep Report
	fail := func(file string, line int, seq, found uint64, format string, args ...any) (Report, error) {
		rep.Failure = &Failure{Segment: file, Line: line, Seq: seq, Found: found, Problem: fmt.Sprintf(format, args...)}
		return rep, nil
	}
	if v.headErr != nil {
		return fail(headFile, 0, 0, 0, "%v", v.headErr)
	}
	if v.head != nil {
		rep.HeadSeq = v.head.Seq
	}
	if v.pruneErr != nil {
		return fail(pruneFile, 0, 0, 0, "%v", v.pruneErr)
	}

	expect, prev := uint64(1), zeroHash
	var last time.Time
	if p := v.prune; p != nil {
		if problem := p.check(opts.Roots); problem != "" {
			return fail(pruneFile, 0, p.ThroughSeq, 0, "%s", problem)
		}
		expect, prev, last = p.ThroughSeq+1, p.ThroughHash, p.Checkpoint.Time
		rep.PrunedThrough, rep.LastCheckpointSeq = p.ThroughSeq, p.ThroughSeq
		rep.Checkpoints++
	}

	ctx, cancel := context.WithCancel(ctx)
	batches, wait := l.checkLines(ctx, v.segs, opts.Roots)
	defer wait()
	defer cancel()

	lastSeg, lastLines := "", 0
	segLines := 0
	for b := range batches {
		<-b.done
		if b.skipped {
			break // cancelled; reported below
		}
		s := v.segs[b.seg]
		for _, it := range b.items {
			segLines++
			if it.torn {
				return fail(s.name(), it.line, expect, 0, "torn record: the segment ends without a newline")
			}
			if bad := checkRecord(it, s, expect, prev, last, v.head); bad != nil {
				bad.Segment, bad.Line = s.name(), it.line
				rep.Failure = bad
				return rep, nil
			}
			r := &it.rec
			if rep.FirstSeq == 0 {
				rep.FirstSeq = r.Seq
			}
			rep.Records++
			rep.LastSeq = r.Seq
			if r.Kind == KindCheckpoint {
				rep.Checkpoints++
				rep.LastCheckpointSeq = r.Seq
			}
			expect, prev, last = r.Seq+1, r.Hash, r.Time
		}
		switch {
		case b.tooLong:
			return fail(s.name(), segLines+1, expect, 0, "%v", errLineTooLong)
		case b.err != nil:
			return rep, fmt.Errorf("audit: verify: %w", b.err)
		case !b.end:
			continue
		case segLines == 0:
			return fail(s.name(), 1, expect, 0, "empty segment")
		}
		rep.Segments++
		lastSeg, lastLines, segLines = s.name(), segLines, 0
	}
	if err := ctx.Err(); err != nil {
		return rep, fmt.Errorf("audit: verify: %w", err)
	}
	if v.head != nil && v.head.Seq >= expect {
		return fail(lastSeg, lastLines+1, expect, 0,
			"the ledger ends at seq %d, but head.json records a checkpoint at seq %d: records were cut off",
			expect-1, v.head.Seq)
	}
	return rep, nil
}

// lineCheck is the part of checking a line that needs no other line:
// decoding, canonical form, hash and checkpoint signature.
type lineCheck struct {
	line    int // 1-based
	torn    bool
	rec     Record
	problem string
	cpErr   error
}

type lineBatch struct {
	seg     int // index into the view's segments
	lines   [][]byte
	items   []lineCheck
	end     bool  // last batch of its segment
	tooLong bool  // the segment continues with an overlong line
	err     error // the segment could not be read further
	skipped bool  // never checked: verification was cancelled
	done    chan struct{}
}

const verifyBatch = 512

// checkLines reads segs in order and checks their lines on all CPUs. It
// returns the batches in ledger order, each to be used once its done is
// closed, and a function that waits for its goroutines after ctx is
// cancelled or the batches are consumed.
func (l *Ledger) checkLines(ctx context.Context, segs []segment, roots []*x509.Certificate) (<-chan *lineBatch, func()) {
	workers := runtime.GOMAXPROCS(0)
	ordered := make(chan *lineBatch, 2*workers)
	work := make(chan *lineBatch)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for b := range work {
				for i := range b.items {
					it := &b.items[i]
					if it.torn {
						continue
					}
					it.rec, it.problem = checkLine(b.lines[i])
					if it.problem == "" && it.rec.Kind == KindCheckpoint {
						it.cpErr = VerifyCheckpoint(it.rec, roots)
					}
				}
				b.lines = nil
				close(b.done)
			}
		})
	}
	wg.Go(func() {
		defer close(work)
		defer close(ordered)
		send := func(b *lineBatch) bool {
			select {
			case ordered <- b:
			case <-ctx.Done():
				return false
			}
			select {
			case work <- b:
				return true
			case <-ctx.Done():
				b.skipped = true
				close(b.done)
				return false
			}
		}
		for si, s := range segs {
			b := &lineBatch{seg: si, done: make(chan struct{})}
			f, err := l.openSegment(s)
			if err != nil {
				b.end, b.err = true, err
				send(b)
				return
			}
			lr := newLineReader(io.NewSectionReader(f, 0, s.size), 256<<10)
			for {
				line, _, complete, err := lr.next()
				if err == io.EOF {
					break
				}
				if errors.Is(err, errLineTooLong) {
					b.tooLong = true
					break
				}
				if err != nil {
					b.err = fmt.Errorf("reading %s: %w", s.name(), err)
					break
				}
				b.lines = append(b.lines, bytes.Clone(line))
				b.items = append(b.items, lineCheck{line: lr.num, torn: !complete})
				if len(b.items) == verifyBatch {
					if !send(b) {
						f.Close()
						return
					}
					b = &lineBatch{seg: si, done: make(chan struct{})}
				}
			}
			f.Close()
			b.end = true
			if !send(b) || b.tooLong || b.err != nil {
				return
			}
		}
	})
	return ordered, wg.Wait
}

// checkRecord checks one line in its place in the chain and returns what is
// wrong with it, or nil.
func checkRecord(it lineCheck, s segment, expect uint64, prev string, last time.Time, head *headState) *Failure {
	r := &it.rec
	bad := func(found uint64, format string, args ...any) *Failure {
		return &Failure{Seq: expect, Found: found, Problem: fmt.Sprintf(format, args...)}
	}
	switch {
	case it.problem != "":
		return bad(r.Seq, "%s", it.problem)
	case r.Seq != expect:
		return bad(r.Seq, "record has seq %d, want %d: records are missing, reordered or duplicated", r.Seq, expect)
	case it.line == 1 && r.Seq != s.first:
		return bad(r.Seq, "segment is named for seq %d but starts with seq %d", s.first, r.Seq)
	case r.Prev != prev:
		return bad(r.Seq, "prev %s is not the previous record's hash %s", r.Prev, prev)
	case !r.Kind.valid():
		return bad(r.Seq, "unknown kind %q", r.Kind)
	case r.Time.Before(last):
		return bad(r.Seq, "time %s is before the previous record's %s",
			r.Time.Format(time.RFC3339Nano), last.Format(time.RFC3339Nano))
	case it.cpErr != nil:
		return bad(r.Seq, "%v", it.cpErr)
	case head != nil && r.Seq == head.Seq && (r.Kind != KindCheckpoint || r.Hash != head.Hash):
		return bad(r.Seq, "head.json records checkpoint hash %s here, the ledger holds a %s with hash %s",
			head.Hash, r.Kind, r.Hash)
	}
	return nil
}
