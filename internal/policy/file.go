package policy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"

	"github.com/meshca/meshca/internal/atomicfile"
)

// FileConfig configures a FileStore.
type FileConfig struct {
	// Path of the JSON policy file. A missing file is Default; Update
	// creates it, and its directory.
	Path string
	// PollInterval is how often Run rereads the file for edits made by
	// hand or by another process (default 2s).
	PollInterval time.Duration
	Clock        clockwork.Clock
	Logger       *slog.Logger
	Metrics      *Metrics
}

// FileStore keeps the policy in a JSON file, for development and
// single-node installs. Writers in any number of processes serialize on a
// lock file next to it (flock), so no update is lost; every write replaces
// the file atomically, so readers never see half of one. An edit by hand
// takes no lock: Update rereads the file just before replacing it and
// starts over if it changed, which narrows, but cannot close, the window
// in which such an edit races a concurrent Update.
type FileStore struct {
	*Live
	cfg FileConfig
	// mu serializes Update and polling within the process, so a poll that
	// read the file before an Update cannot install the older policy after
	// it.
	mu sync.Mutex
}

var _ Store = (*FileStore)(nil)

// NewFileStore validates cfg. It reads nothing: Run does.
func NewFileStore(cfg FileConfig) (*FileStore, error) {
	if cfg.Path == "" {
		return nil, fmt.Errorf("policy: file store needs a path")
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = 2 * time.Second
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	return &FileStore{Live: NewLive(cfg.Logger, cfg.Metrics), cfg: cfg}, nil
}

// Run reads the file, then rereads it every PollInterval until ctx ends.
func (s *FileStore) Run(ctx context.Context) error {
	for {
		s.poll()
		select {
		case <-ctx.Done():
			return nil
		case <-s.cfg.Clock.After(s.cfg.PollInterval):
		}
	}
}

// poll installs the file's policy if it changed and is well formed.
func (s *FileStore) poll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, err := s.read()
	switch {
	case err != nil:
		s.Fail(err)
	case st.err != nil:
		s.Reject(st.rev, st.err)
	default:
		s.Set(st.policy, st.rev)
	}
}

// fileState is one read of the file.
type fileState struct {
	policy Policy
	rev    Revision // "" when the file is absent
	err    error    // the content is malformed
}

// read returns the file's policy; an error means the file could not be
// read, a malformed one is reported in fileState.err.
func (s *FileStore) read() (fileState, error) {
	b, err := os.ReadFile(s.cfg.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return fileState{policy: Default()}, nil
	}
	if err != nil {
		return fileState{}, fmt.Errorf("policy: %w", err)
	}
	st := fileState{rev: revisionOf(b)}
	st.policy, st.err = ParseJSON(b)
	if st.err != nil {
		st.err = fmt.Errorf("policy: %s: %w", s.cfg.Path, st.err)
	}
	return st, nil
}

// revisionOf is the revision of a file holding b: a hash of its bytes.
func revisionOf(b []byte) Revision {
	sum := sha256.Sum256(b)
	return Revision(hex.EncodeToString(sum[:16]))
}

// Update implements Store. It works with or without Run.
func (s *FileStore) Update(ctx context.Context, mutate func(Policy) (Policy, error)) (Policy, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.MkdirAll(filepath.Dir(s.cfg.Path), 0o755); err != nil {
		return Policy{}, fmt.Errorf("policy: %w", err)
	}
	unlock, err := lockFile(s.cfg.Path + ".lock")
	if err != nil {
		return Policy{}, err
	}
	defer unlock()
	for {
		if err := ctx.Err(); err != nil {
			return Policy{}, fmt.Errorf("policy: update: %w", err)
		}
		cur, err := s.read()
		if err != nil {
			return Policy{}, err
		}
		if cur.err != nil {
			return Policy{}, fmt.Errorf("%w; not updating it, fix or remove it: %w", ErrMalformed, cur.err)
		}
		next, err := mutate(clonePolicy(cur.policy))
		if err != nil {
			return Policy{}, err
		}
		next, err = next.Normalize()
		if err != nil {
			return Policy{}, err
		}
		if cur.rev != "" && next.Equal(cur.policy) {
			s.Set(cur.policy, cur.rev)
			return next, nil
		}
		b, err := FormatJSON(next)
		if err != nil {
			return Policy{}, err
		}
		// Writers holding the lock cannot have moved the file; a hand
		// edit can, and is not to be overwritten unseen.
		if again, err := s.read(); err != nil {
			return Policy{}, err
		} else if again.rev != cur.rev {
			s.cfg.Metrics.Conflict()
			continue
		}
		if err := atomicfile.Write(s.cfg.Path, b, 0o644); err != nil {
			return Policy{}, fmt.Errorf("policy: %w", err)
		}
		s.Set(next, revisionOf(b))
		return clonePolicy(next), nil
	}
}
