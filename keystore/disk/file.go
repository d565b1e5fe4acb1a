package disk

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/meshca/meshca/internal/atomicfile"
)

// Files is where a Store keeps its bytes: keystore.json and one <id>.key
// per key, each a small blob replaced as a whole. The format (encryption,
// metadata) is the Store's; a Files only stores and returns bytes, so the
// same format can live in a directory or, shared by processes, elsewhere.
type Files interface {
	// Read returns the content of name, or an error matching
	// fs.ErrNotExist.
	Read(ctx context.Context, name string) ([]byte, error)
	// Write replaces name with data atomically: a reader, or a process
	// restarted after a crash, sees the old content or the new.
	Write(ctx context.Context, name string, data []byte) error
	// Create writes name only if it does not exist yet, and otherwise
	// fails with an error matching fs.ErrExist. Of processes creating a
	// new store at once, exactly one writes its metadata.
	Create(ctx context.Context, name string, data []byte) error
	// Remove deletes name, or fails with an error matching fs.ErrNotExist.
	Remove(ctx context.Context, name string) error
	// List returns the names of the stored files, in any order.
	List(ctx context.Context) ([]string, error)
	// Locate names a file in messages (a path, a Secret's key); Locate("")
	// names the whole store.
	Locate(name string) string
}

// dirFiles is Files in a local directory (mode 0700, files 0600), used by
// one process at a time.
type dirFiles struct{ dir string }

var _ Files = dirFiles{}

// openDir creates dir if missing and checks it before any file in it is
// trusted: it removes leftovers of interrupted writes and refuses the
// directory, keystore.json or a key file if others have access.
func openDir(dir string, log *slog.Logger) (dirFiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return dirFiles{}, fmt.Errorf("keystore/disk: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return dirFiles{}, fmt.Errorf("keystore/disk: %w", err)
	}
	if err := checkPerm(dir, fi); err != nil {
		return dirFiles{}, err
	}
	if err := scan(dir, log); err != nil {
		return dirFiles{}, err
	}
	return dirFiles{dir: dir}, nil
}

func (d dirFiles) Read(_ context.Context, name string) ([]byte, error) {
	return os.ReadFile(d.Locate(name))
}

// Write goes through a temporary file, fsynced and renamed over name, and
// fsyncs the directory, so a crash at any point leaves the old content or
// the new, never a mix.
func (d dirFiles) Write(_ context.Context, name string, data []byte) error {
	return atomicfile.Write(d.Locate(name), data, 0o600)
}

// Create checks, then writes: the directory has one user, so nothing can
// come between.
func (d dirFiles) Create(ctx context.Context, name string, data []byte) error {
	_, err := os.Lstat(d.Locate(name))
	switch {
	case err == nil:
		return fmt.Errorf("%s: %w", d.Locate(name), fs.ErrExist)
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}
	return d.Write(ctx, name, data)
}

func (d dirFiles) Remove(_ context.Context, name string) error {
	if err := os.Remove(d.Locate(name)); err != nil {
		return err
	}
	return atomicfile.SyncDir(d.dir)
}

func (d dirFiles) List(context.Context) ([]string, error) {
	entries, err := os.ReadDir(d.dir)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		if !isTemp(e.Name()) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

func (d dirFiles) Locate(name string) string { return filepath.Join(d.dir, name) }

// scan removes leftovers of interrupted writes and checks the metadata and
// key files' types and permissions.
func scan(dir string, log *slog.Logger) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("keystore/disk: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		path := filepath.Join(dir, name)
		if isTemp(name) {
			if err := os.Remove(path); err != nil {
				return fmt.Errorf("keystore/disk: removing leftover temp file: %w", err)
			}
			log.Warn("Removed leftover temp file of an interrupted write", "file", path)
			continue
		}
		if name != metadataFile && !strings.HasSuffix(name, keySuffix) {
			continue
		}
		fi, err := e.Info() // of the entry itself, not a symlink's target
		if err != nil {
			return fmt.Errorf("keystore/disk: %w", err)
		}
		if name == metadataFile && !fi.Mode().IsRegular() {
			return fmt.Errorf("keystore/disk: %s is not a regular file", path)
		}
		if err := checkPerm(path, fi); err != nil {
			return err
		}
	}
	return nil
}

// checkPerm refuses files others could read or replace, as ssh does, rather
// than quietly keeping keys in a shared place.
func checkPerm(path string, fi fs.FileInfo) error {
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("keystore/disk: %s has mode %#o, want no group or other access", path, perm)
	}
	return nil
}

// isTemp recognises files of writes in flight (atomicfile.TempPrefix). Their
// names start with a dot, which no key id or metadata file can, so they
// never shadow a real file.
func isTemp(name string) bool {
	return strings.HasPrefix(name, atomicfile.TempPrefix)
}
