// Package disk is a keystore.Store that keeps keys in a local directory,
// encrypted at rest under a passphrase.
//
// A copied disk or backup alone does not give away the CA keys: every key
// file is sealed with XChaCha20-Poly1305 under a master key derived once, in
// New, from the passphrase with Argon2id. The key id and format version are
// bound as additional data, so a key file copied or renamed to another id
// fails to open rather than silently standing in for a different key.
//
// Layout of Config.Dir (mode 0700, files 0600):
//
//	keystore.json  format version, KDF name, parameters and salt, and a
//	               verifier (a known plaintext sealed with the master key)
//	               so a wrong passphrase is reported by New, not on first use
//	<id>.key       "meshca-keystore v1\n" || 24-byte nonce || ciphertext of
//	               the PKCS#8 DER private key, sealed with AAD header || id
//	.<file>.tmp*   a write in flight; a leftover one is an interrupted write,
//	               never read, and removed by New
//
// Each write goes to a temporary file in the same directory, is fsynced,
// renamed over its target and the directory fsynced, so a crash leaves either
// the old key or the new one, never a torn file. A directory must be used by
// one process at a time.
package disk

import (
	"context"
	"crypto"
	"crypto/cipher"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/meshca/meshca/internal/atomicfile"
	"github.com/meshca/meshca/keystore"
)

var (
	_ keystore.Store   = (*Store)(nil)
	_ keystore.Deleter = (*Store)(nil)
)

var (
	// ErrWrongPassphrase reports that the passphrase does not unlock the
	// store, or that its metadata was altered.
	ErrWrongPassphrase = errors.New("keystore/disk: wrong passphrase")
	// ErrCorrupt reports a key file or metadata that fails authentication or
	// does not parse: tampering, a file moved between ids, or disk damage.
	ErrCorrupt = errors.New("keystore/disk: corrupt or tampered data")
)

// Config configures a disk store.
type Config struct {
	// Dir holds the store. New creates it with mode 0700 if missing and
	// refuses it, or any file in it, if group or others have access.
	Dir string
	// Passphrase unlocks the store and must not be empty. New does not keep
	// it; the caller may zero it once New returns.
	Passphrase []byte
	// KDF tunes key derivation for a new store. An existing store always
	// uses the parameters recorded when it was created.
	KDF KDFParams
	// Logger receives notices such as removed leftover temp files. Nil
	// discards them.
	Logger *slog.Logger
}

// KDFParams are Argon2id parameters. Zero fields take the defaults, which
// follow the second recommended option of RFC 9106 with less memory, to stay
// usable on small nodes.
type KDFParams struct {
	Time      uint32 // passes over memory; default 2
	MemoryKiB uint32 // default 64 MiB
	Threads   uint8  // default 2
}

// Store is an encrypted on-disk key store. It is safe for concurrent use.
type Store struct {
	dir  string
	aead cipher.AEAD

	// mu orders file replacement against cache updates, so the cache never
	// holds a key other than the one on disk.
	mu    sync.RWMutex
	cache map[string]crypto.Signer
}

// New opens the store in cfg.Dir, creating it if it does not exist yet. It
// derives the master key, so it is deliberately slow, and fails with
// ErrWrongPassphrase if the passphrase does not match the store.
func New(cfg Config) (*Store, error) {
	if cfg.Dir == "" {
		return nil, errors.New("keystore/disk: no directory configured")
	}
	if len(cfg.Passphrase) == 0 {
		return nil, errors.New("keystore/disk: empty passphrase")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	fi, err := os.Stat(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	if err := checkPerm(cfg.Dir, fi); err != nil {
		return nil, err
	}
	keys, err := scan(cfg.Dir, log)
	if err != nil {
		return nil, err
	}

	var aead cipher.AEAD
	md, err := readMetadata(cfg.Dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if keys > 0 {
			// Creating fresh metadata would orphan these keys for good.
			return nil, fmt.Errorf("keystore/disk: %s holds key files but no %s", cfg.Dir, metadataFile)
		}
		aead, err = create(cfg.Dir, cfg.Passphrase, cfg.KDF)
		if err != nil {
			return nil, err
		}
		log.Info("Created key store", "dir", cfg.Dir)
	case err != nil:
		return nil, err
	default:
		aead, err = unlock(cfg.Dir, md, cfg.Passphrase)
		if err != nil {
			return nil, err
		}
	}
	return &Store{
		dir:   cfg.Dir,
		aead:  aead,
		cache: make(map[string]crypto.Signer),
	}, nil
}

// GenerateKey implements keystore.Store.
func (s *Store) GenerateKey(ctx context.Context, id string, kt keystore.KeyType) (crypto.Signer, error) {
	if err := keystore.ValidateID(id); err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	// Generate and seal outside the lock: RSA keys take long enough to stall
	// readers.
	signer, err := keystore.Generate(kt)
	if err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(signer)
	if err != nil {
		return nil, fmt.Errorf("keystore/disk: encoding key %q: %w", id, err)
	}
	data := sealKey(s.aead, id, der)
	clear(der)

	s.mu.Lock()
	defer s.mu.Unlock()
	if err := writeFileAtomic(s.dir, id+keySuffix, data); err != nil {
		// The rename may have happened before the failure; let the next
		// GetKey read whatever is on disk.
		delete(s.cache, id)
		return nil, fmt.Errorf("keystore/disk: storing key %q: %w", id, err)
	}
	s.cache[id] = signer
	return signer, nil
}

// GetKey implements keystore.Store. A key is decrypted on first use and then
// served from memory.
func (s *Store) GetKey(_ context.Context, id string) (crypto.Signer, error) {
	if err := keystore.ValidateID(id); err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	s.mu.RLock()
	signer, ok := s.cache[id]
	s.mu.RUnlock()
	if ok {
		return signer, nil
	}

	// Load under the write lock so a concurrent GenerateKey or DeleteKey
	// cannot slip between reading the file and caching it.
	s.mu.Lock()
	defer s.mu.Unlock()
	if signer, ok := s.cache[id]; ok {
		return signer, nil
	}
	signer, err := s.load(id)
	if err != nil {
		return nil, err
	}
	s.cache[id] = signer
	return signer, nil
}

// DeleteKey implements keystore.Deleter. Deleting an unknown id reports
// keystore.ErrNotFound.
func (s *Store) DeleteKey(_ context.Context, id string) error {
	if err := keystore.ValidateID(id); err != nil {
		return fmt.Errorf("keystore/disk: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.cache, id)
	err := os.Remove(filepath.Join(s.dir, id+keySuffix))
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("keystore/disk: key %q: %w", id, keystore.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("keystore/disk: deleting key %q: %w", id, err)
	}
	if err := atomicfile.SyncDir(s.dir); err != nil {
		return fmt.Errorf("keystore/disk: deleting key %q: %w", id, err)
	}
	return nil
}

func (s *Store) load(id string) (crypto.Signer, error) {
	path := filepath.Join(s.dir, id+keySuffix)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("keystore/disk: key %q: %w", id, keystore.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("keystore/disk: reading key %q: %w", id, err)
	}
	der, err := openKey(s.aead, id, data)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
	}
	defer clear(der)
	// The parse error is left out: it may quote decrypted key bytes.
	key, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: not a PKCS#8 private key", ErrCorrupt, path)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%w: %s: %T is not a signing key", ErrCorrupt, path, key)
	}
	return signer, nil
}

// scan removes leftovers of interrupted writes, checks file permissions and
// counts key files.
func scan(dir string, log *slog.Logger) (keys int, err error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, fmt.Errorf("keystore/disk: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		path := filepath.Join(dir, name)
		if isTemp(name) {
			if err := os.Remove(path); err != nil {
				return 0, fmt.Errorf("keystore/disk: removing leftover temp file: %w", err)
			}
			log.Warn("Removed leftover temp file of an interrupted write", "file", path)
			continue
		}
		if !strings.HasSuffix(name, keySuffix) {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			return 0, fmt.Errorf("keystore/disk: %w", err)
		}
		if err := checkPerm(path, fi); err != nil {
			return 0, err
		}
		keys++
	}
	return keys, nil
}

// checkPerm refuses files others could read or replace, as ssh does, rather
// than quietly keeping keys in a shared place.
func checkPerm(path string, fi fs.FileInfo) error {
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("keystore/disk: %s has mode %#o, want no group or other access", path, perm)
	}
	return nil
}
