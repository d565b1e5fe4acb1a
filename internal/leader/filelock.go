package leader

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
)

// errLocked is tryLock's error when another holds the lock.
var errLocked = errors.New("leader: locked by another holder")

// FileLockConfig configures a FileLock elector.
type FileLockConfig struct {
	// Path of the lock file, created if missing. It holds the leader's
	// identity; do not delete it while replicas run (see FileLock).
	Path string
	// Identity names this candidate in the file (default: as LeaseConfig's,
	// with the process ID appended for whoever reads the file).
	Identity string
	// RetryPeriod is how often a follower tries the lock and a leader
	// checks that its file is still in place (default DefaultRetryPeriod).
	RetryPeriod time.Duration
	Clock       clockwork.Clock
	Logger      *slog.Logger
	// Metrics registers meshca_leader and meshca_leader_transitions_total
	// (nil: not registered).
	Metrics prometheus.Registerer
}

// FileLock is an Elector on an exclusive flock of a file, for development
// and installs on one machine. The kernel drops the lock when the holder's
// process exits however it exits, so a crashed leader is replaced within a
// RetryPeriod. An flock belongs to an open file description, so two
// FileLocks in one process exclude each other too.
//
// A lock on a file that has been deleted or replaced guards nothing: a
// new file at the path would let a second leader in. The leader checks
// every RetryPeriod that the path is still its file and steps down if not,
// so such a second leader overlaps it for at most that long.
type FileLock struct {
	*state
	cfg FileLockConfig
}

var _ Elector = (*FileLock)(nil)

// NewFileLock validates cfg; Run takes the lock.
func NewFileLock(cfg FileLockConfig) (*FileLock, error) {
	if cfg.Path == "" {
		return nil, fmt.Errorf("leader: the file lock needs a path")
	}
	if cfg.Identity == "" {
		cfg.Identity = defaultIdentity() + "/" + strconv.Itoa(os.Getpid())
	}
	if cfg.RetryPeriod <= 0 {
		cfg.RetryPeriod = DefaultRetryPeriod
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.Logger = cfg.Logger.With("lock", cfg.Path)
	return &FileLock{state: newState(cfg.Identity, cfg.Logger, cfg.Metrics), cfg: cfg}, nil
}

// Run implements Elector. It returns an error, having stepped down, if the
// lock file cannot be opened or locked for any reason but another holder:
// on one machine that is a misconfiguration, not an outage to wait out.
func (f *FileLock) Run(ctx context.Context) error {
	ticker := f.cfg.Clock.NewTicker(f.cfg.RetryPeriod)
	defer ticker.Stop()
	var held *os.File
	defer func() { f.release(held) }()
	for {
		var err error
		if held == nil {
			held, err = f.acquire()
		} else if !stillAt(held, f.cfg.Path) {
			f.cfg.Logger.Warn("lock file was deleted or replaced; stepping down")
			f.release(held)
			held = nil
		}
		if err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.Chan():
		}
	}
}

// acquire tries the lock once. It returns the locked file, or nil and the
// holder's identity recorded if another holds it.
func (f *FileLock) acquire() (*os.File, error) {
	file, err := os.OpenFile(f.cfg.Path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("leader: %w", err)
	}
	err = tryLock(file)
	if errors.Is(err, errLocked) {
		f.observe(readHolder(file))
		file.Close()
		return nil, nil
	}
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("leader: lock %s: %w", f.cfg.Path, err)
	}
	// A file deleted or replaced between open and lock is locked in
	// vain: a newcomer opens the new one.
	if !stillAt(file, f.cfg.Path) {
		file.Close()
		return nil, nil
	}
	if err = file.Truncate(0); err == nil {
		_, err = file.WriteAt([]byte(f.identity+"\n"), 0)
	}
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("leader: writing identity to %s: %w", f.cfg.Path, err)
	}
	f.setLeading(true)
	return file, nil
}

// release steps down, then gives the lock up: in that order, so nothing
// acts as leader here once another may.
func (f *FileLock) release(file *os.File) {
	f.stepDown()
	if file == nil {
		return
	}
	_ = file.Truncate(0) // best effort: only followers' Leader reads it
	file.Close()         // drops the lock
}

// stillAt reports whether path names the file that file has open.
func stillAt(file *os.File, path string) bool {
	opened, err := file.Stat()
	if err != nil {
		return false
	}
	named, err := os.Stat(path)
	return err == nil && os.SameFile(opened, named)
}

// readHolder returns the identity a leader wrote, or "" if it cannot be
// read (a leader between truncating and writing, say).
func readHolder(file *os.File) string {
	b := make([]byte, 512)
	n, _ := file.ReadAt(b, 0)
	line, _, _ := bytes.Cut(b[:n], []byte("\n"))
	return string(line)
}
