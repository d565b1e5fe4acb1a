// Package memory is a keystore.Store that keeps keys in process memory only.
//
// Keys vanish when the process exits, so it suits tests and development, never
// a CA whose certificates must outlive a restart.
package memory

import (
	"context"
	"crypto"
	"fmt"
	"sync"

	"github.com/meshca/meshca/keystore"
)

var (
	_ keystore.Store   = (*Store)(nil)
	_ keystore.Deleter = (*Store)(nil)
)

// Store is an in-memory key store. It is safe for concurrent use.
type Store struct {
	mu   sync.RWMutex
	keys map[string]crypto.Signer
}

// New returns an empty store.
func New() *Store {
	return &Store{keys: make(map[string]crypto.Signer)}
}

// GenerateKey implements keystore.Store.
func (s *Store) GenerateKey(ctx context.Context, id string, kt keystore.KeyType) (crypto.Signer, error) {
	if err := keystore.ValidateID(id); err != nil {
		return nil, fmt.Errorf("keystore/memory: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("keystore/memory: %w", err)
	}
	// Generate outside the lock: RSA keys take long enough to stall readers.
	signer, err := keystore.Generate(kt)
	if err != nil {
		return nil, fmt.Errorf("keystore/memory: %w", err)
	}
	s.mu.Lock()
	s.keys[id] = signer
	s.mu.Unlock()
	return signer, nil
}

// GetKey implements keystore.Store.
func (s *Store) GetKey(_ context.Context, id string) (crypto.Signer, error) {
	if err := keystore.ValidateID(id); err != nil {
		return nil, fmt.Errorf("keystore/memory: %w", err)
	}
	s.mu.RLock()
	signer, ok := s.keys[id]
	s.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("keystore/memory: key %q: %w", id, keystore.ErrNotFound)
	}
	return signer, nil
}

// DeleteKey implements keystore.Deleter. Deleting an unknown id reports
// keystore.ErrNotFound.
func (s *Store) DeleteKey(_ context.Context, id string) error {
	if err := keystore.ValidateID(id); err != nil {
		return fmt.Errorf("keystore/memory: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.keys[id]; !ok {
		return fmt.Errorf("keystore/memory: key %q: %w", id, keystore.ErrNotFound)
	}
	delete(s.keys, id)
	return nil
}
