package audit

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Prune removes whole segments whose records are all older than before,
// oldest first, and returns how many records went. It only cuts right after
// a checkpoint that ends a segment — the writer ends every full segment with
// one — and keeps that checkpoint in prune.json, so the remaining ledger
// still verifies from a signature. The active segment is never removed, and
// a ledger without a Signer is never pruned.
//
// Readers that are iterating keep seeing the segments they started with;
// the files go when the last of them finishes.
func (l *Ledger) Prune(before time.Time) (int, error) {
	if l.readOnly {
		return 0, ErrReadOnly
	}
	l.pruneMu.Lock()
	defer l.pruneMu.Unlock()

	l.mu.Lock()
	segs := slices.Clone(l.segs)
	l.mu.Unlock()
	cut := -1
	for i := 0; i+1 < len(segs); i++ {
		s := segs[i]
		if s.count == 0 || s.maxTime.IsZero() || !s.maxTime.Before(before) {
			break
		}
		if s.lastKind == KindCheckpoint {
			cut = i
		}
	}
	if cut < 0 {
		return 0, nil
	}
	last := segs[cut]
	cp, err := l.readCheckpoint(last)
	if err != nil {
		return 0, fmt.Errorf("audit: prune: %s: %w", last.name(), err)
	}
	st := pruneState{ThroughSeq: cp.Seq, ThroughHash: cp.Hash, Checkpoint: cp}
	// prune.json first: a crash before the files are gone leaves segments
	// New recognises as pruned, never a ledger that starts mid-chain with
	// nothing vouching for its start.
	if err := writeState(l.dir, pruneFile, st); err != nil {
		return 0, fmt.Errorf("audit: prune: %w", err)
	}

	l.mu.Lock()
	var keep []segment
	var doomed []string
	removed := 0
	for _, s := range l.segs {
		if s.first <= last.first {
			doomed = append(doomed, filepath.Join(l.dir, s.name()))
			removed += s.count
			continue
		}
		keep = append(keep, s)
	}
	l.segs = keep
	for key, locs := range l.serials {
		locs = slices.DeleteFunc(locs, func(lc loc) bool { return lc.seg <= last.first })
		if len(locs) == 0 {
			delete(l.serials, key)
		} else {
			l.serials[key] = locs
		}
	}
	l.prune = &st
	l.doomed = append(l.doomed, doomed...)
	var now []string
	if l.readers == 0 {
		now, l.doomed = l.doomed, nil
	}
	l.mu.Unlock()
	l.removeSegments(now)
	l.log.Info("Pruned the audit ledger", "throughSeq", st.ThroughSeq, "records", removed, "segments", len(doomed))
	return removed, nil
}

// readCheckpoint reads and checks the checkpoint that ends segment s.
func (l *Ledger) readCheckpoint(s segment) (Record, error) {
	f, err := os.Open(filepath.Join(l.dir, s.name()))
	if err != nil {
		return Record{}, err
	}
	defer f.Close()
	line, err := readLineAt(f, s.lastOff, s.size)
	if err != nil {
		return Record{}, err
	}
	cp, problem := checkLine(line)
	if problem != "" {
		return Record{}, fmt.Errorf("last record: %s", problem)
	}
	if cp.Kind != KindCheckpoint || cp.Seq != s.lastSeq {
		return Record{}, fmt.Errorf("last record is %s seq %d, not the checkpoint the index expects", cp.Kind, cp.Seq)
	}
	if err := VerifyCheckpoint(cp, nil); err != nil {
		return Record{}, err
	}
	return cp, nil
}
