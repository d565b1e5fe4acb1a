package audit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/meshca/meshca/internal/atomicfile"
)

const (
	// queueLen and maxBatch bound memory: a batch of typical records is a
	// few MiB.
	queueLen = 4096
	maxBatch = 4096
	// The signer runs on the write path: a slow one holds up appends, a
	// failing one is retried no more often than signRetry.
	signTimeout = 10 * time.Second
	signRetry   = 5 * time.Second
)

type request struct {
	rec  Record
	done chan result // buffered: the writer never blocks on a waiter
}

type result struct {
	rec Record
	err error
}

// writer is the state of the single goroutine that writes, guarded by
// Ledger.wmu. Everything here describes durable data only: it advances
// after a batch is synced, so a failed batch leaves it where the next batch
// must continue.
type writer struct {
	f        File   // the active segment, opened lazily
	haveSeg  bool   // whether there is an active segment at all
	segFirst uint64 // its first seq, hence its name
	size     int64  // its durable size
	indexed  bool   // whether it is in Ledger.segs yet
	recover  bool   // a write failed: reopen and truncate to size first

	next uint64    // seq of the next record
	prev string    // hash of the last record
	last time.Time // time of the last record: record times never go back

	sinceCP       int       // records since the last checkpoint
	unsignedSince time.Time // when, by the clock, the oldest of them was written
	signAfter     time.Time // no signing attempt before then, after a failure

	// lastCommit is when, in real time, the last batch was written: the
	// spacing of commits is a matter of CPU cost, not of the ledger's clock.
	lastCommit time.Time

	closed bool
	buf    bytes.Buffer
	items  []item // the batch's appended records
	cps    []item // and its checkpoints
}

type item struct {
	req *request
	rec Record
	off int64 // offset in the batch buffer
	n   int
}

// Append adds rec to the ledger and returns it as written, with seq, time,
// prev and hash set, once it is durable: written and fsynced. Appends that
// arrive while the writer is busy are committed together with one write and
// one fsync (group commit).
//
// Append waits for Run (or Close) to write the record, as long as ctx
// allows. If ctx ends first, the record may or may not be in the ledger. A
// write or sync failure is reported as ErrUnavailable, and then the record
// is not in the ledger.
func (l *Ledger) Append(ctx context.Context, rec Record) (Record, error) {
	if l.readOnly {
		return Record{}, ErrReadOnly
	}
	switch rec.Kind {
	case KindIssued, KindDenied, KindAdmin:
	default:
		return Record{}, fmt.Errorf("audit: cannot append a record of kind %q", rec.Kind)
	}
	if rec.Head != "" || rec.Signature != nil || rec.SignerChain != nil {
		return Record{}, errors.New("audit: only checkpoints carry head, signature and signer chain")
	}
	select {
	case <-l.closing:
		return Record{}, ErrClosed
	default:
	}
	req := &request{rec: rec, done: make(chan result, 1)}
	select {
	case l.reqs <- req:
	case <-l.closing:
		return Record{}, ErrClosed
	case <-ctx.Done():
		return Record{}, fmt.Errorf("audit: append: %w", ctx.Err())
	}
	select {
	case res := <-req.done:
		return res.rec, res.err
	case <-ctx.Done():
		return Record{}, fmt.Errorf("audit: append: %w", ctx.Err())
	case <-l.closed:
		// Close may have written this very request before closing.
		select {
		case res := <-req.done:
			return res.rec, res.err
		default:
			return Record{}, ErrClosed
		}
	}
}

// Run writes appended records until ctx ends or Close is called, then
// writes what is already queued and returns. Only one Run may be active.
func (l *Ledger) Run(ctx context.Context) error {
	if l.readOnly {
		return ErrReadOnly
	}
	select {
	case <-l.closing:
		return ErrClosed
	default:
	}
	if !l.wmu.TryLock() {
		return errors.New("audit: Run is already running")
	}
	defer l.wmu.Unlock()
	// Records queued when ctx ends are still written, and signing needs a
	// context that outlives ctx for that.
	bg := context.WithoutCancel(ctx)

	// The timer bounds how long records stay unsigned when appends stop.
	var (
		timer <-chan time.Time
		rearm = func() {}
	)
	if l.cfg.Signer != nil && l.cfg.CheckpointInterval > 0 {
		t := l.clock.NewTimer(l.checkpointIn())
		defer t.Stop()
		timer = t.Chan()
		rearm = func() { t.Reset(l.checkpointIn()) }
	}
	for {
		select {
		case <-ctx.Done():
			l.drain(bg)
			return nil
		case <-l.closing:
			return nil // Close writes the queue
		case req := <-l.reqs:
			l.commit(bg, l.linger(ctx, l.gather(req)))
			rearm()
		case <-timer:
			l.commit(bg, nil)
			rearm()
		}
	}
}

// checkpointIn is how long until records pending a checkpoint are due one.
func (l *Ledger) checkpointIn() time.Duration {
	iv := l.cfg.CheckpointInterval
	if l.w.sinceCP == 0 {
		return iv // nothing to sign: look again later
	}
	due := l.w.unsignedSince.Add(iv)
	if due.Before(l.w.signAfter) {
		due = l.w.signAfter
	}
	return max(l.clock.Until(due), 0)
}

// gather collects first and whatever else is queued, up to maxBatch.
func (l *Ledger) gather(first *request) []*request {
	batch := []*request{first}
	for len(batch) < maxBatch {
		select {
		case req := <-l.reqs:
			batch = append(batch, req)
		default:
			return batch
		}
	}
	return batch
}

// linger holds a batch back until CommitDelay has passed since the previous
// commit, adding what arrives meanwhile, so that a steady stream of appends
// is synced in a few large batches instead of many small ones.
func (l *Ledger) linger(ctx context.Context, batch []*request) []*request {
	wait := l.cfg.CommitDelay - time.Since(l.w.lastCommit)
	if l.cfg.CommitDelay <= 0 || wait <= 0 || len(batch) >= maxBatch {
		return batch
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	for len(batch) < maxBatch {
		select {
		case req := <-l.reqs:
			batch = append(batch, req)
		case <-t.C:
			return batch
		case <-ctx.Done():
			return batch
		case <-l.closing:
			return batch
		}
	}
	return batch
}

// drain writes everything queued.
func (l *Ledger) drain(ctx context.Context) {
	for {
		select {
		case req := <-l.reqs:
			l.commit(ctx, l.gather(req))
		default:
			return
		}
	}
}

// Close stops the ledger: it refuses new appends, writes those already
// queued, waits for Run to return and closes the segment file. Appends
// still waiting then fail with ErrClosed.
func (l *Ledger) Close() error {
	if l.readOnly {
		return nil
	}
	l.closeOnce.Do(func() { close(l.closing) })
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if l.w.closed {
		return nil
	}
	l.drain(context.Background())
	l.w.closed = true
	close(l.closed)
	if l.w.f != nil {
		err := l.w.f.Close()
		l.w.f = nil
		if err != nil {
			return fmt.Errorf("audit: %w", err)
		}
	}
	return nil
}

// commit writes one batch — the given appends and, when due, a checkpoint —
// with one write and one fsync, then answers every waiter.
func (l *Ledger) commit(ctx context.Context, batch []*request) {
	w := &l.w
	if w.closed {
		for _, req := range batch {
			req.done <- result{err: ErrClosed}
		}
		return
	}
	w.buf.Reset()
	w.items, w.cps = w.items[:0], w.cps[:0]
	signFailed := l.clock.Now().Before(w.signAfter)
	if len(batch) == 0 && (signFailed || !l.checkpointDue(w.sinceCP)) {
		return // a timer tick with nothing due
	}
	began := time.Now() // latency metric only: real time, not the injected clock
	w.lastCommit = began
	if err := l.prepare(); err != nil {
		l.fail(batch, err)
		return
	}

	now := l.clock.Now().UTC()
	if now.Before(w.last) {
		now = w.last
	}
	seq, prev := w.next, w.prev
	unsigned := w.sinceCP // records after the last checkpoint, this batch's included
	for _, req := range batch {
		r := req.rec
		r.Seq, r.Time, r.Prev, r.Hash = seq, now, prev, ""
		r.NotBefore, r.NotAfter = r.NotBefore.UTC(), r.NotAfter.UTC()
		line, err := seal(&r)
		if err == nil && len(line) > maxRecord {
			err = fmt.Errorf("audit: record of %d bytes exceeds the limit of %d", len(line), maxRecord)
		}
		if err != nil {
			req.done <- result{err: err}
			continue
		}
		w.items = append(w.items, item{req: req, rec: r, off: int64(w.buf.Len()), n: len(line)})
		w.buf.Write(line)
		seq, prev = seq+1, r.Hash
		unsigned++
		if every := l.cfg.CheckpointEvery; l.cfg.Signer != nil && every > 0 && unsigned >= every && !signFailed {
			// Exactly every CheckpointEvery records, even mid-batch.
			if cp, ok := l.addCheckpoint(ctx, seq, prev, now); ok {
				seq, prev, unsigned = seq+1, cp.rec.Hash, 0
			} else {
				signFailed = true
			}
		}
	}
	if unsigned > 0 && !signFailed && l.checkpointDue(unsigned) {
		if cp, ok := l.addCheckpoint(ctx, seq, prev, now); ok {
			seq, prev, unsigned = seq+1, cp.rec.Hash, 0
		} else {
			signFailed = true
		}
	}
	if w.buf.Len() == 0 {
		return
	}

	if err := l.write(w.buf.Bytes()); err != nil {
		for i := range w.items {
			w.items[i].req.done <- result{err: fmt.Errorf("%w: %w", ErrUnavailable, err)}
		}
		l.metrics.unavailable.Inc()
		l.log.Error("Audit ledger write failed; records refused", "records", len(w.items), "err", err)
		return
	}

	// Durable: advance the writer, then the index, then answer.
	base := w.size
	w.size += int64(w.buf.Len())
	w.next, w.prev, w.last = seq, prev, now
	if unsigned > 0 && (w.sinceCP == 0 || len(w.cps) > 0) {
		// The oldest unsigned record is from this batch.
		w.unsignedSince = l.clock.Now()
	}
	w.sinceCP = unsigned
	l.index(base)
	for _, it := range w.items {
		it.req.done <- result{rec: it.rec}
		l.metrics.records.WithLabelValues(string(it.rec.Kind)).Inc()
	}
	l.metrics.batchSeconds.Observe(time.Since(began).Seconds())
	l.metrics.batchRecords.Observe(float64(len(w.items)))

	if m := l.cfg.Mirror; m != nil {
		if _, err := m.Write(w.buf.Bytes()); err != nil {
			l.metrics.mirrorErrors.Inc()
			l.log.Warn("Audit mirror write failed", "err", err)
		}
	}
	if n := len(w.cps); n > 0 {
		l.metrics.records.WithLabelValues(string(KindCheckpoint)).Add(float64(n))
		// After the sync: head.json must never name a checkpoint that a
		// crash could lose.
		cp := w.cps[n-1].rec
		if err := writeState(l.dir, headFile, headState{Seq: cp.Seq, Hash: cp.Hash}); err != nil {
			l.log.Error("Could not record the audit ledger's head; truncation past it would go unnoticed", "err", err)
		}
	}
}

// addCheckpoint signs a checkpoint over the record (seq-1, head) and adds it
// to the batch being built. A signing failure is logged and counted; the
// records stay unsigned until the next attempt.
func (l *Ledger) addCheckpoint(ctx context.Context, seq uint64, head string, now time.Time) (item, bool) {
	w := &l.w
	r, err := l.checkpoint(ctx, head, seq)
	if err == nil {
		r.Seq, r.Time, r.Prev = seq, now, head
		var line []byte
		if line, err = seal(&r); err == nil {
			cp := item{rec: r, off: int64(w.buf.Len()), n: len(line)}
			w.buf.Write(line)
			w.cps = append(w.cps, cp)
			return cp, true
		}
	}
	// Whether or not the batch gets written, do not hammer the signer.
	w.signAfter = l.clock.Now().Add(signRetry)
	l.metrics.checkpointErrors.Inc()
	l.log.Error("Could not write an audit checkpoint; records stay unsigned until the next attempt", "err", err)
	return item{}, false
}

// checkpointDue reports whether the batch being built, which leaves unsigned
// records unsigned, should end with a checkpoint.
func (l *Ledger) checkpointDue(unsigned int) bool {
	w := &l.w
	if l.cfg.Signer == nil || unsigned == 0 {
		return false
	}
	if every := l.cfg.CheckpointEvery; every > 0 && unsigned >= every {
		return true
	}
	// Only records from earlier batches can be overdue.
	if iv := l.cfg.CheckpointInterval; iv > 0 && w.sinceCP > 0 && l.clock.Since(w.unsignedSince) >= iv {
		return true
	}
	// A batch that fills the segment seals it with a checkpoint, so that
	// Prune can cut right after it.
	return w.size+int64(w.buf.Len()) >= l.cfg.SegmentBytes
}

func (l *Ledger) checkpoint(ctx context.Context, head string, seq uint64) (Record, error) {
	ctx, cancel := context.WithTimeout(ctx, signTimeout)
	defer cancel()
	return signCheckpoint(ctx, l.cfg.Signer, head, seq)
}

// prepare makes the active segment ready for the next batch: it repairs the
// file after a failed write and starts a new segment when the current one
// is full.
func (l *Ledger) prepare() error {
	w := &l.w
	if w.recover && w.haveSeg {
		if w.f != nil {
			w.f.Close()
			w.f = nil
		}
		f, err := l.cfg.OpenFile(l.segPath(w.segFirst), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return fmt.Errorf("reopening segment: %w", err)
		}
		// Cut whatever the failed batch left; with O_APPEND the next write
		// lands right after the last durable record.
		if err := f.Truncate(w.size); err != nil {
			f.Close()
			return fmt.Errorf("truncating segment after a failed write: %w", err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return fmt.Errorf("syncing segment: %w", err)
		}
		w.f = f
	}
	w.recover = false
	if w.haveSeg && w.size < l.cfg.SegmentBytes {
		if w.f == nil {
			f, err := l.cfg.OpenFile(l.segPath(w.segFirst), os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				return fmt.Errorf("opening segment: %w", err)
			}
			w.f = f
		}
		return nil
	}

	// Start a segment named after the next seq.
	if w.f != nil {
		if err := w.f.Close(); err != nil {
			l.log.Warn("Closing a full audit segment failed", "err", err)
		}
		w.f = nil
	}
	w.haveSeg = false
	path := l.segPath(w.next)
	f, err := l.cfg.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("creating segment: %w", err)
	}
	// No acknowledged record can be in a segment the index does not know:
	// anything there is left from a failed first batch.
	if err := f.Truncate(0); err != nil {
		f.Close()
		return fmt.Errorf("creating segment: %w", err)
	}
	// The segment's name must be durable before any record in it is
	// acknowledged.
	if err := atomicfile.SyncDir(l.dir); err != nil {
		f.Close()
		return fmt.Errorf("creating segment: %w", err)
	}
	w.f, w.haveSeg, w.segFirst, w.size, w.indexed = f, true, w.next, 0, false
	return nil
}

// write appends data to the active segment and syncs it. On failure it cuts
// the segment back to its durable size, or leaves that to prepare when it
// cannot.
func (l *Ledger) write(data []byte) error {
	w := &l.w
	n, err := w.f.Write(data)
	if err == nil && n < len(data) {
		err = io.ErrShortWrite
	}
	if err == nil {
		if err = w.f.Sync(); err != nil {
			err = fmt.Errorf("sync %s: %w", segName(w.segFirst), err)
		}
	} else {
		err = fmt.Errorf("write %s: %w", segName(w.segFirst), err)
	}
	if err != nil {
		// Truncate now so that a crash before the next batch does not
		// keep refused records; prepare reopens and truncates again, as
		// after a failed fsync the page cache cannot be trusted.
		if terr := w.f.Truncate(w.size); terr != nil {
			l.log.Error("Could not cut a failed write off the audit segment", "err", terr)
		}
		w.recover = true
		return err
	}
	return nil
}

// index records a durable batch, starting at base in the active segment, in
// the in-memory index.
func (l *Ledger) index(base int64) {
	w := &l.w
	l.mu.Lock()
	defer l.mu.Unlock()
	if !w.indexed {
		l.segs = append(l.segs, segment{first: w.segFirst})
		w.indexed = true
	}
	s := &l.segs[len(l.segs)-1]
	// Records and checkpoints interleave in the batch; add them in order.
	items, cps := w.items, w.cps
	for len(items) > 0 || len(cps) > 0 {
		var it item
		if len(cps) == 0 || len(items) > 0 && items[0].off < cps[0].off {
			it, items = items[0], items[1:]
		} else {
			it, cps = cps[0], cps[1:]
			l.head = &headState{Seq: it.rec.Seq, Hash: it.rec.Hash}
		}
		off := base + it.off
		s.add(it.rec.Seq, it.rec.Time, it.rec.Kind, off, it.n)
		if it.rec.Kind == KindIssued {
			s.noteIssued(it.rec.NotAfter)
		}
		if it.rec.Kind == KindIssued && it.rec.Serial != "" {
			key := strings.ToLower(it.rec.Serial)
			l.serials[key] = append(l.serials[key], loc{seg: w.segFirst, off: off})
		}
	}
}

func (l *Ledger) fail(batch []*request, err error) {
	for _, req := range batch {
		req.done <- result{err: fmt.Errorf("%w: %w", ErrUnavailable, err)}
	}
	l.metrics.unavailable.Inc()
	l.log.Error("Audit ledger unavailable; records refused", "records", len(batch), "err", err)
}

func (l *Ledger) segPath(first uint64) string {
	return filepath.Join(l.dir, segName(first))
}
