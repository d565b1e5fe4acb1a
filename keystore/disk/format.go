package disk

import (
	"context"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/chacha20poly1305"
)

const (
	metadataFile  = "keystore.json"
	keySuffix     = ".key"
	formatVersion = 1

	// fileHeader starts every key file and is part of its AAD, so a future
	// format cannot be mistaken for this one.
	fileHeader = "meshca-keystore v1\n"

	verifierAAD       = "meshca-keystore v1 verifier"
	verifierPlaintext = "meshca-keystore passphrase verifier"

	kdfArgon2id = "argon2id"
	saltSize    = 16

	defaultTime      = 2
	defaultMemoryKiB = 64 * 1024
	defaultThreads   = 2
)

// metadata is the content of keystore.json.
type metadata struct {
	Version  int       `json:"version"`
	KDF      kdfParams `json:"kdf"`
	Verifier []byte    `json:"verifier"`
}

// kdfParams records everything needed to derive the master key again, so
// changing the defaults never locks out an existing store.
type kdfParams struct {
	Name      string `json:"name"`
	Time      uint32 `json:"time"`
	MemoryKiB uint32 `json:"memory_kib"`
	Threads   uint8  `json:"threads"`
	Salt      []byte `json:"salt"`
}

func (p kdfParams) validate() error {
	switch {
	case p.Name != kdfArgon2id:
		return fmt.Errorf("unsupported KDF %q", p.Name)
	case p.Time < 1:
		return errors.New("argon2id time must be at least 1")
	case p.Threads < 1:
		return errors.New("argon2id threads must be at least 1")
	case p.MemoryKiB < 8*uint32(p.Threads):
		return errors.New("argon2id memory must be at least 8 KiB per thread")
	case len(p.Salt) < saltSize:
		return fmt.Errorf("salt shorter than %d bytes", saltSize)
	}
	return nil
}

// deriveAEAD runs Argon2id and keeps the result only inside the AEAD.
func deriveAEAD(passphrase []byte, p kdfParams) (cipher.AEAD, error) {
	key := argon2.IDKey(passphrase, p.Salt, p.Time, p.MemoryKiB, p.Threads, chacha20poly1305.KeySize)
	defer clear(key)
	return chacha20poly1305.NewX(key)
}

// create writes the metadata of a new store and returns its AEAD. The
// error matches fs.ErrExist if another process created the store first.
func create(ctx context.Context, files Files, passphrase []byte, cfg KDFParams) (cipher.AEAD, error) {
	p := kdfParams{
		Name:      kdfArgon2id,
		Time:      orDefault(cfg.Time, defaultTime),
		MemoryKiB: orDefault(cfg.MemoryKiB, defaultMemoryKiB),
		Threads:   orDefault(cfg.Threads, defaultThreads),
		Salt:      make([]byte, saltSize),
	}
	rand.Read(p.Salt) // never fails; it crashes the program instead
	if err := p.validate(); err != nil {
		return nil, fmt.Errorf("keystore/disk: KDF parameters: %w", err)
	}
	aead, err := deriveAEAD(passphrase, p)
	if err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	md := metadata{
		Version:  formatVersion,
		KDF:      p,
		Verifier: seal(aead, []byte(verifierPlaintext), []byte(verifierAAD)),
	}
	data, err := json.MarshalIndent(md, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	if err := files.Create(ctx, metadataFile, append(data, '\n')); err != nil {
		return nil, fmt.Errorf("keystore/disk: writing %s: %w", metadataFile, err)
	}
	return aead, nil
}

// readMetadata loads keystore.json; the error matches fs.ErrNotExist if the
// store has not been created yet.
func readMetadata(ctx context.Context, files Files) (*metadata, error) {
	data, err := files.Read(ctx, metadataFile)
	if err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	path := files.Locate(metadataFile)
	var md metadata
	if err := json.Unmarshal(data, &md); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
	}
	if md.Version != formatVersion {
		return nil, fmt.Errorf("keystore/disk: %s: unsupported format version %d", path, md.Version)
	}
	if err := md.KDF.validate(); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
	}
	return &md, nil
}

// unlock derives the master key of an existing store and checks it against
// the verifier; where names the store.
func unlock(where string, md *metadata, passphrase []byte) (cipher.AEAD, error) {
	aead, err := deriveAEAD(passphrase, md.KDF)
	if err != nil {
		return nil, fmt.Errorf("keystore/disk: %w", err)
	}
	pt, err := open(aead, md.Verifier, []byte(verifierAAD))
	if err != nil || string(pt) != verifierPlaintext {
		return nil, fmt.Errorf("%w for %s", ErrWrongPassphrase, where)
	}
	return aead, nil
}

func sealKey(aead cipher.AEAD, id string, der []byte) []byte {
	sealed := seal(aead, der, keyAAD(id))
	return append([]byte(fileHeader), sealed...)
}

func openKey(aead cipher.AEAD, id string, data []byte) ([]byte, error) {
	if len(data) < len(fileHeader) || string(data[:len(fileHeader)]) != fileHeader {
		return nil, errors.New("unknown file format")
	}
	return open(aead, data[len(fileHeader):], keyAAD(id))
}

// keyAAD binds a key file to its id and format version.
func keyAAD(id string) []byte {
	return []byte(fileHeader + id)
}

// seal returns nonce || ciphertext. Random 24-byte nonces are safe to use for
// any number of writes under one key, which is why this is XChaCha.
func seal(aead cipher.AEAD, plaintext, aad []byte) []byte {
	n := aead.NonceSize()
	out := make([]byte, n, n+len(plaintext)+aead.Overhead())
	rand.Read(out) // never fails; it crashes the program instead
	return aead.Seal(out, out, plaintext, aad)
}

func open(aead cipher.AEAD, sealed, aad []byte) ([]byte, error) {
	n := aead.NonceSize()
	if len(sealed) < n+aead.Overhead() {
		return nil, errors.New("ciphertext too short")
	}
	pt, err := aead.Open(nil, sealed[:n], sealed[n:], aad)
	if err != nil {
		return nil, errors.New("authentication failed")
	}
	return pt, nil
}

func orDefault[T uint8 | uint32](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}
