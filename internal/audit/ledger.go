package audit

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/internal/atomicfile"
)

var (
	// ErrUnavailable reports that records could not be made durable. The
	// records of the failed batch are not in the ledger.
	ErrUnavailable = errors.New("audit: ledger unavailable")
	// ErrClosed reports use of a closed ledger.
	ErrClosed = errors.New("audit: ledger closed")
	// ErrReadOnly reports a write to a ledger opened with OpenReadOnly.
	ErrReadOnly = errors.New("audit: ledger is read-only")
	// ErrCorrupt reports a ledger that cannot be safely appended to: its
	// last record does not parse, its state files are damaged, or it ends
	// before its last checkpoint. Open it with OpenReadOnly and Verify it.
	ErrCorrupt = errors.New("audit: ledger corrupt")
	// ErrTampered reports a ledger that failed Verify.
	ErrTampered = errors.New("audit: ledger failed verification")
)

// Defaults for Config.
const (
	DefaultSegmentBytes       = 64 << 20
	DefaultCheckpointEvery    = 1000
	DefaultCheckpointInterval = time.Minute
	DefaultCommitDelay        = 2 * time.Millisecond
)

// File is the part of *os.File the writer uses for segments.
type File interface {
	io.Writer
	Sync() error
	Truncate(size int64) error
	Close() error
}

// Config configures a Ledger.
type Config struct {
	// Dir holds the ledger; New creates it with mode 0700 if missing. One
	// process at a time may write a directory.
	Dir string
	// SegmentBytes is the size past which the writer starts a new segment
	// file (default 64 MiB). A segment may exceed it by one batch.
	SegmentBytes int64
	// CheckpointEvery is the number of records after which the writer signs
	// a checkpoint (default 1000; negative: never by count).
	CheckpointEvery int
	// CheckpointInterval bounds the time, by Clock, that records stay
	// unsigned (default 1 minute; negative: never by time).
	CheckpointInterval time.Duration
	// CommitDelay spaces group commits under load: a batch that would start
	// less than CommitDelay after the previous one waits out the rest and
	// takes in what arrives meanwhile (default 2ms; negative: never wait).
	// Every fsync costs CPU time in the kernel, so without a delay a busy
	// server spends a large share of its CPUs syncing batches of one or two
	// records. Appends that arrive further apart than CommitDelay never
	// wait.
	CommitDelay time.Duration
	// Signer signs checkpoints. Nil disables them, and with them the
	// detection of records cut off the end of the ledger, and pruning. It
	// runs on the write path, so it should be quick, like a key in memory;
	// after a failure it is tried again no sooner than 5 seconds later.
	Signer Signer
	// Mirror, if set, receives every record as a JSON line once it is
	// durable. Its errors are logged and counted; they never fail an
	// Append. A slow Mirror slows the writer.
	Mirror io.Writer

	Clock   clockwork.Clock
	Logger  *slog.Logger
	Metrics prometheus.Registerer

	// OpenFile opens segment files for the writer; nil is os.OpenFile.
	// Tests use it to inject disk faults.
	OpenFile func(name string, flag int, perm fs.FileMode) (File, error)
}

// Ledger is an append-only, hash-chained audit ledger in a directory. It is
// safe for concurrent use.
type Ledger struct {
	cfg      Config
	dir      string
	readOnly bool
	clock    clockwork.Clock
	log      *slog.Logger
	metrics  *metrics

	reqs      chan *request
	closing   chan struct{} // closed by Close: no new appends
	closed    chan struct{} // closed once Close has written the queue
	closeOnce sync.Once

	// wmu is held by whoever writes: Run, or Close draining the queue.
	wmu sync.Mutex
	w   writer

	// pruneMu serialises Prune calls.
	pruneMu sync.Mutex

	// mu guards the index and the state below; readers copy what they need
	// under it and read files without it.
	mu       sync.Mutex
	segs     []segment
	serials  map[string][]loc
	prune    *pruneState
	head     *headState
	pruneErr error // a prune.json that does not parse (read-only opens)
	headErr  error // likewise head.json
	readers  int
	doomed   []string // pruned segment files left for the last reader to delete
}

// New opens the ledger in cfg.Dir, creating it if needed. It scans the
// segments to rebuild the in-memory index and cuts off a torn final line,
// which no Append was ever told was written. It starts nothing: call Run to
// write.
func New(cfg Config) (*Ledger, error) {
	if cfg.Dir == "" {
		return nil, errors.New("audit: no directory configured")
	}
	if cfg.SegmentBytes <= 0 {
		cfg.SegmentBytes = DefaultSegmentBytes
	}
	if cfg.CheckpointEvery == 0 {
		cfg.CheckpointEvery = DefaultCheckpointEvery
	}
	if cfg.CheckpointInterval == 0 {
		cfg.CheckpointInterval = DefaultCheckpointInterval
	}
	if cfg.CommitDelay == 0 {
		cfg.CommitDelay = DefaultCommitDelay
	}
	if cfg.OpenFile == nil {
		cfg.OpenFile = func(name string, flag int, perm fs.FileMode) (File, error) {
			return os.OpenFile(name, flag, perm)
		}
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	l := newLedger(cfg, false)
	if err := l.load(); err != nil {
		return nil, err
	}
	return l, nil
}

// OpenReadOnly opens a ledger for Query, Verify, Stats and Export only, for
// example another replica's. It changes nothing on disk and sees the ledger
// as it was when opened; a torn final line, possibly a write in flight, is
// left out.
func OpenReadOnly(dir string) (*Ledger, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("audit: %s is not a directory", dir)
	}
	l := newLedger(Config{Dir: dir, SegmentBytes: DefaultSegmentBytes}, true)
	if err := l.load(); err != nil {
		return nil, err
	}
	return l, nil
}

func newLedger(cfg Config, readOnly bool) *Ledger {
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	var reg prometheus.Registerer
	if !readOnly {
		reg = cfg.Metrics
	}
	return &Ledger{
		cfg:      cfg,
		dir:      cfg.Dir,
		readOnly: readOnly,
		clock:    cfg.Clock,
		log:      cfg.Logger,
		metrics:  newMetrics(reg),
		reqs:     make(chan *request, queueLen),
		closing:  make(chan struct{}),
		closed:   make(chan struct{}),
		serials:  make(map[string][]loc),
	}
}

// Dir is the ledger's directory.
func (l *Ledger) Dir() string { return l.dir }

// load rebuilds the index from the directory and sets up the writer to
// continue the chain.
func (l *Ledger) load() error {
	entries, err := os.ReadDir(l.dir)
	if err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	var firsts []uint64 // ReadDir sorts by name, hence by seq
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, atomicfile.TempPrefix) && !l.readOnly {
			if err := os.Remove(filepath.Join(l.dir, name)); err != nil {
				return fmt.Errorf("audit: removing leftover temp file: %w", err)
			}
			l.log.Warn("Removed leftover temp file of an interrupted write", "file", name)
			continue
		}
		if first, ok := parseSegName(name); ok && e.Type().IsRegular() {
			firsts = append(firsts, first)
		}
	}

	if err := l.loadState(); err != nil {
		return err
	}
	var cpSeq uint64
	var cpTime time.Time
	if p := l.prune; p != nil && l.pruneErr == nil {
		cpSeq, cpTime = p.ThroughSeq, p.Checkpoint.Time
		// Segments wholly inside the pruned range are left over from a
		// Prune interrupted between writing prune.json and deleting them.
		var keep []uint64
		for i, first := range firsts {
			if i+1 < len(firsts) && firsts[i+1] <= p.ThroughSeq+1 {
				if !l.readOnly {
					if err := os.Remove(filepath.Join(l.dir, segName(first))); err != nil {
						return fmt.Errorf("audit: finishing prune: %w", err)
					}
				}
				continue
			}
			keep = append(keep, first)
		}
		firsts = keep
	}

	for i, first := range firsts {
		path := filepath.Join(l.dir, segName(first))
		res, err := scanSegment(path, first, l.serials)
		if err != nil {
			return err
		}
		last := i == len(firsts)-1
		if res.tornAt >= 0 && last {
			if !l.readOnly {
				if err := truncateFile(path, res.tornAt); err != nil {
					return err
				}
				l.log.Warn("Cut off a torn final record, never acknowledged", "segment", path,
					"bytes", res.seg.size-res.tornAt)
			}
			res.seg.size = res.tornAt
		}
		if last && res.seg.count == 0 {
			// Created by a writer that died before its first batch was
			// durable, or emptied just now; for a read-only view, possibly
			// one being written.
			if l.readOnly {
				continue
			}
			if err := os.Remove(path); err != nil {
				return fmt.Errorf("audit: %w", err)
			}
			if err := atomicfile.SyncDir(l.dir); err != nil {
				return fmt.Errorf("audit: %w", err)
			}
			continue
		}
		if res.lastCPSeq > 0 {
			cpSeq, cpTime = res.lastCPSeq, res.lastCPTime
		}
		l.segs = append(l.segs, res.seg)
	}

	w := &l.w
	w.next, w.prev = 1, zeroHash
	if p := l.prune; p != nil && l.pruneErr == nil {
		w.next, w.prev, w.last = p.ThroughSeq+1, p.ThroughHash, p.Checkpoint.Time
	}
	if n := len(l.segs); n > 0 {
		s := l.segs[n-1]
		r, err := readRecordAt(filepath.Join(l.dir, s.name()), s.lastOff, s.size)
		if err != nil && !l.readOnly {
			return fmt.Errorf("%w: last record of %s: %v", ErrCorrupt, s.name(), err)
		}
		if err == nil {
			w.next, w.prev, w.last = r.Seq+1, r.Hash, r.Time
		}
		w.haveSeg, w.segFirst, w.size, w.indexed = true, s.first, s.size, true
	}
	if !l.readOnly && l.head != nil && w.next-1 < l.head.Seq {
		return fmt.Errorf("%w: it ends at seq %d but its last checkpoint was seq %d: records were cut off",
			ErrCorrupt, w.next-1, l.head.Seq)
	}
	// Records left unsigned by the last run count as unsigned since the
	// last checkpoint, or since now if there never was one.
	w.sinceCP = int(w.next - 1 - cpSeq)
	w.unsignedSince = cpTime
	if w.unsignedSince.IsZero() {
		w.unsignedSince = l.clock.Now()
	}
	return nil
}

// loadState reads head.json and prune.json. A writable ledger refuses
// damaged ones; a read-only one keeps the damage for Verify to report.
func (l *Ledger) loadState() error {
	var head headState
	ok, err := readState(l.dir, headFile, &head)
	switch {
	case err != nil && !l.readOnly:
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	case err != nil:
		l.headErr = err
	case ok:
		l.head = &head
	}
	var ps pruneState
	ok, err = readState(l.dir, pruneFile, &ps)
	switch {
	case err != nil && !l.readOnly:
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	case err != nil:
		l.pruneErr = err
	case ok:
		if problem := ps.check(nil); problem != "" {
			err := fmt.Errorf("%s: %s", pruneFile, problem)
			if !l.readOnly {
				return fmt.Errorf("%w: %v", ErrCorrupt, err)
			}
			l.pruneErr = err
		}
		l.prune = &ps
	}
	return nil
}

func truncateFile(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	return nil
}

func readRecordAt(path string, off, limit int64) (Record, error) {
	f, err := os.Open(path)
	if err != nil {
		return Record{}, err
	}
	defer f.Close()
	line, err := readLineAt(f, off, limit)
	if err != nil {
		return Record{}, err
	}
	return decodeLine(line)
}

func decodeLine(line []byte) (Record, error) {
	var r Record
	if err := json.Unmarshal(line, &r); err != nil {
		return r, err
	}
	if r.Seq == 0 || r.Hash == "" || !r.Kind.valid() {
		return r, errors.New("record lacks seq, hash or kind")
	}
	return r, nil
}

// view is a reader's consistent picture of the ledger. Segment files in it
// stay on disk until release, even if pruned meanwhile.
type view struct {
	segs     []segment
	prune    *pruneState
	head     *headState
	pruneErr error
	headErr  error
}

func (l *Ledger) acquire() view {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.readers++
	return view{
		segs:     append([]segment(nil), l.segs...),
		prune:    l.prune,
		head:     l.head,
		pruneErr: l.pruneErr,
		headErr:  l.headErr,
	}
}

func (l *Ledger) release() {
	l.mu.Lock()
	l.readers--
	var doomed []string
	if l.readers == 0 {
		doomed, l.doomed = l.doomed, nil
	}
	l.mu.Unlock()
	l.removeSegments(doomed)
}

func (l *Ledger) removeSegments(paths []string) {
	if len(paths) == 0 {
		return
	}
	for _, p := range paths {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			l.log.Error("Could not remove pruned audit segment", "file", p, "err", err)
		}
	}
	if err := atomicfile.SyncDir(l.dir); err != nil {
		l.log.Error("Could not sync the audit directory after pruning", "err", err)
	}
}

func (l *Ledger) openSegment(s segment) (*os.File, error) {
	f, err := os.Open(filepath.Join(l.dir, s.name()))
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	return f, nil
}
