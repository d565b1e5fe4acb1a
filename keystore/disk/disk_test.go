package disk_test

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/meshca/meshca/internal/atomicfile"
	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/keystore/disk"
	"github.com/meshca/meshca/keystore/keystoretest"
)

// cheapKDF keeps tests fast; the format records it, so reopening a store
// needs no KDF configuration at all.
var cheapKDF = disk.KDFParams{Time: 1, MemoryKiB: 64, Threads: 1}

var passphrase = []byte("correct horse battery staple")

func newDir(t *testing.T) string {
	return filepath.Join(t.TempDir(), "keys")
}

func open(t *testing.T, dir string) *disk.Store {
	t.Helper()
	s, err := disk.New(disk.Config{Dir: dir, Passphrase: passphrase, KDF: cheapKDF})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s
}

func generate(t *testing.T, s *disk.Store, id string, kt keystore.KeyType) crypto.Signer {
	t.Helper()
	signer, err := s.GenerateKey(t.Context(), id, kt)
	if err != nil {
		t.Fatalf("GenerateKey(%q): %v", id, err)
	}
	return signer
}

// mustGet loads id and checks the key is whole by signing with it.
func mustGet(t *testing.T, s *disk.Store, id string) crypto.Signer {
	t.Helper()
	signer, err := s.GetKey(t.Context(), id)
	if err != nil {
		t.Fatalf("GetKey(%q): %v", id, err)
	}
	if err := signVerify(signer); err != nil {
		t.Fatalf("key %q: %v", id, err)
	}
	return signer
}

func signVerify(signer crypto.Signer) error {
	digest := sha256.Sum256([]byte("disk_test"))
	sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return err
	}
	switch pub := signer.Public().(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest[:], sig) {
			return errors.New("signature does not verify")
		}
		return nil
	case *rsa.PublicKey:
		return rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig)
	}
	return fmt.Errorf("unexpected key type %T", signer.Public())
}

func samePublicKey(a, b crypto.Signer) bool {
	return a.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(b.Public())
}

func TestConformance(t *testing.T) {
	keystoretest.Run(t, func(t *testing.T) keystore.Store { return open(t, newDir(t)) })
}

func TestReopen(t *testing.T) {
	dir := newDir(t)
	s := open(t, dir)
	want := map[string]crypto.Signer{
		"ec":  generate(t, s, "ec", keystore.ECDSAP384),
		"rsa": generate(t, s, "rsa", keystore.RSA2048),
	}

	// No KDF parameters: the store must use the ones it was created with.
	reopened, err := disk.New(disk.Config{Dir: dir, Passphrase: passphrase})
	if err != nil {
		t.Fatalf("reopening: %v", err)
	}
	for id, signer := range want {
		if got := mustGet(t, reopened, id); !samePublicKey(got, signer) {
			t.Errorf("key %q changed across reopen", id)
		}
	}
}

func TestWrongPassphrase(t *testing.T) {
	dir := newDir(t)
	signer := generate(t, open(t, dir), "ca", keystore.ECDSAP256)

	wrong := []byte("incorrect horse")
	_, err := disk.New(disk.Config{Dir: dir, Passphrase: wrong, KDF: cheapKDF})
	if !errors.Is(err, disk.ErrWrongPassphrase) {
		t.Fatalf("New with wrong passphrase = %v, want disk.ErrWrongPassphrase", err)
	}
	if msg := err.Error(); !strings.Contains(msg, dir) || strings.Contains(msg, string(wrong)) || strings.Contains(msg, string(passphrase)) {
		t.Errorf("error %q should name the directory and no passphrase", msg)
	}

	// The failed attempt must leave the store usable.
	if got := mustGet(t, open(t, dir), "ca"); !samePublicKey(got, signer) {
		t.Error("key changed after a wrong-passphrase attempt")
	}
}

func TestNewRejects(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	loose := filepath.Join(t.TempDir(), "loose")
	if err := os.Mkdir(loose, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(loose, 0o755); err != nil { // despite the umask
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		cfg  disk.Config
	}{
		{"empty passphrase", disk.Config{Dir: newDir(t), Passphrase: []byte{}, KDF: cheapKDF}},
		{"nil passphrase", disk.Config{Dir: newDir(t), KDF: cheapKDF}},
		{"no directory", disk.Config{Passphrase: passphrase, KDF: cheapKDF}},
		{"directory is a file", disk.Config{Dir: file, Passphrase: passphrase, KDF: cheapKDF}},
		{"directory open to others", disk.Config{Dir: loose, Passphrase: passphrase, KDF: cheapKDF}},
		{"too little KDF memory", disk.Config{Dir: newDir(t), Passphrase: passphrase, KDF: disk.KDFParams{MemoryKiB: 8, Threads: 4}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, err := disk.New(tt.cfg)
			if err == nil {
				t.Fatalf("New succeeded, returned %v", s)
			}
			if !strings.HasPrefix(err.Error(), "keystore/disk: ") {
				t.Errorf("error %q lacks the keystore/disk prefix", err)
			}
		})
	}
}

func TestFileModes(t *testing.T) {
	dir := newDir(t)
	s := open(t, dir)
	generate(t, s, "ca", keystore.ECDSAP256)
	generate(t, s, "ca", keystore.ECDSAP256) // a replacement is written anew

	for _, tt := range []struct {
		path string
		want fs.FileMode
	}{
		{dir, fs.ModeDir | 0o700},
		{filepath.Join(dir, "keystore.json"), 0o600},
		{filepath.Join(dir, "ca.key"), 0o600},
	} {
		fi, err := os.Stat(tt.path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode(); got != tt.want {
			t.Errorf("%s has mode %v, want %v", tt.path, got, tt.want)
		}
	}

	// A key file others can read is refused rather than trusted.
	if err := os.Chmod(filepath.Join(dir, "ca.key"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := disk.New(disk.Config{Dir: dir, Passphrase: passphrase}); err == nil {
		t.Error("New accepted a key file readable by others")
	}
}

func TestTamperedKeyFile(t *testing.T) {
	for _, tt := range []struct {
		name   string
		tamper func([]byte) []byte
	}{
		{"last ciphertext byte", func(b []byte) []byte { b[len(b)-1] ^= 1; return b }},
		{"middle byte", func(b []byte) []byte { b[len(b)/2] ^= 0x80; return b }},
		{"nonce", func(b []byte) []byte { b[bytes.IndexByte(b, '\n')+1] ^= 1; return b }},
		{"header", func(b []byte) []byte { b[0] ^= 1; return b }},
		{"truncated", func(b []byte) []byte { return b[:len(b)-10] }},
		{"header only", func(b []byte) []byte { return b[:bytes.IndexByte(b, '\n')+1] }},
		{"empty", func([]byte) []byte { return nil }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := newDir(t)
			generate(t, open(t, dir), "ca", keystore.ECDSAP256)
			path := filepath.Join(dir, "ca.key")
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, tt.tamper(b), 0o600); err != nil {
				t.Fatal(err)
			}

			_, err = open(t, dir).GetKey(t.Context(), "ca")
			if !errors.Is(err, disk.ErrCorrupt) {
				t.Fatalf("GetKey of a tampered key = %v, want disk.ErrCorrupt", err)
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("error %q does not name the file", err)
			}
		})
	}
}

func TestTamperedMetadata(t *testing.T) {
	for _, tt := range []struct {
		name    string
		old     string
		new     string
		wantErr error
	}{
		// A different salt derives a different key, indistinguishable from
		// a wrong passphrase.
		{"salt", `"salt": "`, `"salt": "AAAA`, disk.ErrWrongPassphrase},
		{"verifier", `"verifier": "`, `"verifier": "AAAA`, disk.ErrWrongPassphrase},
		{"KDF", `"argon2id"`, `"scrypt"`, disk.ErrCorrupt},
		{"syntax", `{`, `[`, disk.ErrCorrupt},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := newDir(t)
			open(t, dir)
			path := filepath.Join(dir, "keystore.json")
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Contains(b, []byte(tt.old)) {
				t.Fatalf("%s does not contain %s:\n%s", path, tt.old, b)
			}
			b = bytes.Replace(b, []byte(tt.old), []byte(tt.new), 1)
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := disk.New(disk.Config{Dir: dir, Passphrase: passphrase}); !errors.Is(err, tt.wantErr) {
				t.Fatalf("New = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestMissingMetadata(t *testing.T) {
	dir := newDir(t)
	generate(t, open(t, dir), "ca", keystore.ECDSAP256)
	if err := os.Remove(filepath.Join(dir, "keystore.json")); err != nil {
		t.Fatal(err)
	}
	// Starting afresh would strand the existing key under a new master key.
	if _, err := disk.New(disk.Config{Dir: dir, Passphrase: passphrase, KDF: cheapKDF}); err == nil {
		t.Fatal("New created fresh metadata next to existing key files")
	}
}

func TestKeyFileMovedToAnotherID(t *testing.T) {
	dir := newDir(t)
	s := open(t, dir)
	generate(t, s, "a", keystore.ECDSAP256)
	generate(t, s, "b", keystore.ECDSAP256)
	read := func(id string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, id+".key"))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	a, b := read("a"), read("b")
	for id, data := range map[string][]byte{"a": b, "b": a, "c": a} {
		if err := os.WriteFile(filepath.Join(dir, id+".key"), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}

	s = open(t, dir)
	for _, id := range []string{"a", "b", "c"} {
		if _, err := s.GetKey(t.Context(), id); !errors.Is(err, disk.ErrCorrupt) {
			t.Errorf("GetKey(%q) of another id's key file = %v, want disk.ErrCorrupt", id, err)
		}
	}
}

// TestInterruptedWrite lays out the directory as a writer killed between
// writing its temp file and renaming it leaves it: the old key in place and
// the new one, whole or partial, in a temp file beside it.
func TestInterruptedWrite(t *testing.T) {
	for _, tt := range []struct {
		name string
		temp func(newKey []byte) []byte
	}{
		{"complete", func(b []byte) []byte { return b }},
		{"partial", func(b []byte) []byte { return b[:len(b)/2] }},
		{"empty", func([]byte) []byte { return nil }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := newDir(t)
			s := open(t, dir)
			path := filepath.Join(dir, "ca.key")
			old := generate(t, s, "ca", keystore.ECDSAP256)
			oldFile, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			generate(t, s, "ca", keystore.ECDSAP256)
			newFile, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, oldFile, 0o600); err != nil {
				t.Fatal(err)
			}
			// The name atomicfile.Write gives its temp file for ca.key.
			temp := filepath.Join(dir, atomicfile.TempPrefix+"ca.key-2718281828")
			if err := os.WriteFile(temp, tt.temp(newFile), 0o600); err != nil {
				t.Fatal(err)
			}

			s = open(t, dir)
			if got := mustGet(t, s, "ca"); !samePublicKey(got, old) {
				t.Error("the interrupted write replaced the old key")
			}
			if _, err := os.Stat(temp); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("leftover temp file not removed: %v", err)
			}
			assertFiles(t, dir, "ca.key", "keystore.json")
		})
	}
}

const crashEnv = "MESHCA_KEYSTORE_DISK_CRASH_DIR"

// TestCrash kills a process that keeps replacing a key, at whatever point it
// happens to be, and checks that the key on disk is whole every time.
func TestCrash(t *testing.T) {
	const (
		id      = "ca"
		crashes = 5
	)
	dir := newDir(t)
	prev := generate(t, open(t, dir), id, keystore.ECDSAP256)
	for i := range crashes {
		runUntilKilled(t, dir, 5+i)
		if temps, _ := filepath.Glob(filepath.Join(dir, ".*")); len(temps) > 0 {
			t.Logf("crash %d interrupted a write: %q", i, temps)
		}

		s := open(t, dir)
		got := mustGet(t, s, id)
		if samePublicKey(got, prev) {
			t.Fatalf("crash %d: key unchanged after the child reported completed writes", i)
		}
		prev = got
		assertFiles(t, dir, "ca.key", "keystore.json")
	}
}

// runUntilKilled starts TestHelperProcess on dir and SIGKILLs it once it has
// reported the given number of completed writes.
func runUntilKilled(t *testing.T, dir string, writes int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), crashEnv+"="+dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := 0
	for sc := bufio.NewScanner(stdout); done < writes && sc.Scan(); {
		if sc.Text() == "wrote" {
			done++
		}
	}
	// SIGKILL: no deferred code or signal handler runs in the child.
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if done < writes {
		t.Fatalf("child exited after %d writes:\n%s", done, stderr.Bytes())
	}
}

// TestHelperProcess is the child of TestCrash. It replaces one key forever,
// reporting each completed write, until it is killed.
func TestHelperProcess(t *testing.T) {
	dir := os.Getenv(crashEnv)
	if dir == "" {
		return // not a child of TestCrash
	}
	s, err := disk.New(disk.Config{Dir: dir, Passphrase: passphrase})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	// Mixed types vary the file size, so a torn write would show.
	types := []keystore.KeyType{keystore.ECDSAP256, keystore.RSA2048, keystore.ECDSAP384}
	for i := 0; ; i++ {
		if _, err := s.GenerateKey(t.Context(), "ca", types[i%len(types)]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Println("wrote")
	}
}

func assertFiles(t *testing.T, dir string, want ...string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	if !slices.Equal(got, want) {
		t.Errorf("%s holds %q, want %q", dir, got, want)
	}
}
