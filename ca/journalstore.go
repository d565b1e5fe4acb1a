package ca

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"

	"github.com/meshca/meshca/internal/atomicfile"
)

// ErrJournalConflict reports that the journal changed since it was read:
// another replica wrote it first. The writer re-reads and decides again.
var ErrJournalConflict = errors.New("ca: the CA journal was changed by another writer")

// JournalStore persists the CA journal: a file on one machine, a Secret
// shared by the replicas in a cluster.
type JournalStore interface {
	// Load returns the stored journal and its revision, or an error
	// matching fs.ErrNotExist when there is none yet.
	Load(ctx context.Context) (data []byte, rev string, err error)
	// Save stores data if the stored revision is still rev (an empty rev:
	// if nothing is stored yet) and returns the new revision; otherwise it
	// stores nothing and returns an error matching ErrJournalConflict.
	Save(ctx context.Context, data []byte, rev string) (string, error)
}

// FileJournal is a JournalStore in one file, written atomically. Its
// revision is a hash of the content; the compare-and-swap is only as good
// as the caller's exclusion (one process, or the dev lock), since a file
// has no conditional write.
type FileJournal struct{ Path string }

// Load implements JournalStore.
func (f FileJournal) Load(context.Context) ([]byte, string, error) {
	data, err := os.ReadFile(f.Path)
	if err != nil {
		return nil, "", fmt.Errorf("ca: journal: %w", err)
	}
	return data, contentRevision(data), nil
}

// Save implements JournalStore.
func (f FileJournal) Save(_ context.Context, data []byte, rev string) (string, error) {
	cur, err := os.ReadFile(f.Path)
	switch {
	case isNotExist(err):
		if rev != "" {
			return "", fmt.Errorf("%w: %s was removed", ErrJournalConflict, f.Path)
		}
	case err != nil:
		return "", fmt.Errorf("ca: journal: %w", err)
	case contentRevision(cur) != rev && !bytes.Equal(cur, data):
		return "", fmt.Errorf("%w: %s", ErrJournalConflict, f.Path)
	}
	if err := atomicfile.Write(f.Path, data, 0o600); err != nil {
		return "", fmt.Errorf("ca: journal: %w", err)
	}
	return contentRevision(data), nil
}

func contentRevision(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:8])
}
