package disk_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/keystore/disk"
	"github.com/meshca/meshca/keystore/keystoretest"
)

// memFiles is disk.Files in memory, standing for a backend that several
// processes share.
type memFiles struct {
	mu    sync.Mutex
	files map[string][]byte
}

var _ disk.Files = (*memFiles)(nil)

func newMemFiles() *memFiles { return &memFiles{files: map[string][]byte{}} }

func (m *memFiles) Read(_ context.Context, name string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.files[name]
	if !ok {
		return nil, fmt.Errorf("%s: %w", name, fs.ErrNotExist)
	}
	return slices.Clone(b), nil
}

func (m *memFiles) Write(_ context.Context, name string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.files[name] = slices.Clone(data)
	return nil
}

func (m *memFiles) Create(_ context.Context, name string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.files[name]; ok {
		return fmt.Errorf("%s: %w", name, fs.ErrExist)
	}
	m.files[name] = slices.Clone(data)
	return nil
}

func (m *memFiles) Remove(_ context.Context, name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.files[name]; !ok {
		return fmt.Errorf("%s: %w", name, fs.ErrNotExist)
	}
	delete(m.files, name)
	return nil
}

func (m *memFiles) List(context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Collect(maps.Keys(m.files)), nil
}

func (m *memFiles) Locate(name string) string { return "mem:" + name }

func (m *memFiles) get(name string) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.files[name]
}

func openFiles(t *testing.T, f disk.Files) *disk.Store {
	t.Helper()
	s, err := disk.New(disk.Config{Files: f, Passphrase: passphrase, KDF: cheapKDF})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s
}

func TestConformanceFiles(t *testing.T) {
	keystoretest.Run(t, func(t *testing.T) keystore.Store { return openFiles(t, newMemFiles()) })
}

func TestFilesHoldOnlySealedKeys(t *testing.T) {
	f := newMemFiles()
	s := openFiles(t, f)
	generate(t, s, "ca", keystore.ECDSAP256)
	names, _ := f.List(t.Context())
	if got := slices.Sorted(slices.Values(names)); !slices.Equal(got, []string{"ca.key", "keystore.json"}) {
		t.Fatalf("files %q, want ca.key and keystore.json", got)
	}
	if b := f.get("ca.key"); !strings.HasPrefix(string(b), "meshca-keystore v1\n") {
		t.Fatalf("ca.key does not start with the format header: %q", b[:min(len(b), 20)])
	}
}

// TestSharedFiles opens stores on one Files at once, as server replicas
// do: exactly one creates the metadata, all share its master key, and each
// sees what the others write and delete.
func TestSharedFiles(t *testing.T) {
	f := newMemFiles()
	stores := make([]*disk.Store, 4)
	errs := make([]error, len(stores))
	var wg sync.WaitGroup
	for i := range stores {
		wg.Go(func() { stores[i], errs[i] = disk.New(disk.Config{Files: f, Passphrase: passphrase, KDF: cheapKDF}) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("store %d: New: %v", i, err)
		}
	}
	a, b := stores[0], stores[len(stores)-1]

	first := generate(t, a, "ca", keystore.ECDSAP256)
	for i, s := range stores {
		if got := mustGet(t, s, "ca"); !samePublicKey(got, first) {
			t.Fatalf("store %d reads another key than the one store 0 generated", i)
		}
	}
	replaced := generate(t, b, "ca", keystore.ECDSAP384)
	if got := mustGet(t, a, "ca"); !samePublicKey(got, replaced) {
		t.Fatal("a store served its stale key after another replaced it")
	}
	if err := b.DeleteKey(t.Context(), "ca"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.GetKey(t.Context(), "ca"); !errors.Is(err, keystore.ErrNotFound) {
		t.Fatalf("GetKey of a key another store deleted = %v, want keystore.ErrNotFound", err)
	}
}

func TestFilesWrongPassphrase(t *testing.T) {
	f := newMemFiles()
	openFiles(t, f)
	_, err := disk.New(disk.Config{Files: f, Passphrase: []byte("incorrect horse"), KDF: cheapKDF})
	if !errors.Is(err, disk.ErrWrongPassphrase) || !strings.Contains(err.Error(), "mem:") {
		t.Fatalf("New with a wrong passphrase = %v, want disk.ErrWrongPassphrase naming the store", err)
	}
}

func TestFilesMissingMetadata(t *testing.T) {
	f := newMemFiles()
	generate(t, openFiles(t, f), "ca", keystore.ECDSAP256)
	if err := f.Remove(t.Context(), "keystore.json"); err != nil {
		t.Fatal(err)
	}
	if _, err := disk.New(disk.Config{Files: f, Passphrase: passphrase, KDF: cheapKDF}); err == nil {
		t.Fatal("New created fresh metadata next to existing key files")
	}
}

func TestFilesAndDirExclusive(t *testing.T) {
	_, err := disk.New(disk.Config{Dir: newDir(t), Files: newMemFiles(), Passphrase: passphrase, KDF: cheapKDF})
	if err == nil || !strings.HasPrefix(err.Error(), "keystore/disk: ") {
		t.Fatalf("New with Dir and Files = %v, want a keystore/disk error", err)
	}
}
