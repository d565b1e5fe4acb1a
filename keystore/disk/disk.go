// Package disk is a keystore.Store that keeps keys in a local directory,
// encrypted at rest under a passphrase. The same format can live elsewhere
// through Config.Files, such as a Kubernetes Secret that server replicas
// share.
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
//
// A store in Config.Files may be shared: processes that open it with the
// same passphrase share its keys. Of processes creating it at once, one
// writes the metadata and the others adopt it. GetKey then reads the key
// file on every call instead of serving keys from memory, so a key that
// another process replaced or deleted is never served stale. The CA would
// not be misled by a stale key, since it gives every new key a fresh id and
// deletes one only once its journal no longer names it; but GenerateKey's
// replacement and DeleteKey are then what every process sees, as with a
// single store, for one read per GetKey, which the CA calls only at start,
// intermediate renewal and root rotation.
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
	"strings"
	"sync"

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
	// Files holds the store instead of Dir, which must then be empty. It
	// may be shared by processes (see the package documentation).
	Files Files
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

// Store is an encrypted key store. It is safe for concurrent use.
type Store struct {
	files Files
	aead  cipher.AEAD

	// mu orders file replacement against cache updates, so the cache never
	// holds a key other than the one stored.
	mu sync.RWMutex
	// cache holds decrypted keys of a directory store; it is nil for a
	// store in Config.Files, which others may change.
	cache map[string]crypto.Signer
}

// New opens the store in cfg.Dir or cfg.Files, creating it if it does not
// exist yet. It derives the master key, so it is deliberately slow, and
// fails with ErrWrongPassphrase if the passphrase does not match the store.
// It calls cfg.Files without a deadline: the Files bounds its own calls.
func New(cfg Config) (*Store, error) {
	if cfg.Dir == "" && cfg.Files == nil {
		return nil, errors.New("keystore/disk: no directory configured")
	}
	if cfg.Dir != "" && cfg.Files != nil {
		return nil, errors.New("keystore/disk: both a directory and Files configured")
	}
	if len(cfg.Passphrase) == 0 {
		return nil, errors.New("keystore/disk: empty passphrase")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Store{files: cfg.Files}
	if cfg.Files == nil {
		dir, err := openDir(cfg.Dir, log)
		if err != nil {
			return nil, err
		}
		s.files, s.cache = dir, make(map[string]crypto.Signer)
	}

	ctx := context.Background()
	names, err := s.files.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	keys := 0
	for _, name := range names {
		if strings.HasSuffix(name, keySuffix) {
			keys++
		}
	}
	md, err := readMetadata(ctx, s.files)
	if errors.Is(err, fs.ErrNotExist) {
		if keys > 0 {
			// Creating fresh metadata would orphan these keys for good.
			return nil, fmt.Errorf("keystore/disk: %s holds key files but no %s", s.files.Locate(""), metadataFile)
		}
		s.aead, err = create(ctx, s.files, cfg.Passphrase, cfg.KDF)
		if err == nil {
			log.Info("Created key store", "store", s.files.Locate(""))
			return s, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return nil, err
		}
		// Another process sharing the files created the store first.
		md, err = readMetadata(ctx, s.files)
	}
	if err != nil {
		return nil, err
	}
	if s.aead, err = unlock(s.files.Locate(""), md, cfg.Passphrase); err != nil {
		return nil, err
	}
	return s, nil
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
	if err := s.files.Write(ctx, id+keySuffix, data); err != nil {
		// The rename may have happened before the failure; let the next
		// GetKey read whatever is stored.
		delete(s.cache, id)
		return nil, fmt.Errorf("keystore/disk: storing key %q: %w", id, err)
	}
	if s.cache != nil {
		s.cache[id] = signer
	}
	return signer, nil
}

// GetKey implements keystore.Store. A key in a directory is decrypted on
// first use and then served from memory; one in Config.Files is read and
// decrypted on every call.
func (s *Store) GetKey(ctx context.Context, id string) (crypto.Signer, error) {
	if err := keystore.ValidateID(id); err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	if s.cache == nil {
		return s.load(ctx, id)
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
	signer, err := s.load(ctx, id)
	if err != nil {
		return nil, err
	}
	s.cache[id] = signer
	return signer, nil
}

// DeleteKey implements keystore.Deleter. Deleting an unknown id reports
// keystore.ErrNotFound.
func (s *Store) DeleteKey(ctx context.Context, id string) error {
	if err := keystore.ValidateID(id); err != nil {
		return fmt.Errorf("keystore/disk: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.cache, id)
	err := s.files.Remove(ctx, id+keySuffix)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("keystore/disk: key %q: %w", id, keystore.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("keystore/disk: deleting key %q: %w", id, err)
	}
	return nil
}

func (s *Store) load(ctx context.Context, id string) (crypto.Signer, error) {
	name := id + keySuffix
	data, err := s.files.Read(ctx, name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("keystore/disk: key %q: %w", id, keystore.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("keystore/disk: reading key %q: %w", id, err)
	}
	path := s.files.Locate(name)
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
