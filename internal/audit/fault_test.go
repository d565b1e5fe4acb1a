package audit_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/internal/audit"
)

type fault int32

const (
	noFault fault = iota
	fullDiskPartial
	fullDiskNothing
	syncFails
)

// faultyFile is a segment file on a disk that can fill up or fail fsync.
type faultyFile struct {
	*os.File
	mode *atomic.Int32
}

func (f faultyFile) Write(p []byte) (int, error) {
	switch fault(f.mode.Load()) {
	case fullDiskPartial:
		// What a real full disk does: part of the batch lands first.
		n, _ := f.File.Write(p[:len(p)/2])
		return n, syscall.ENOSPC
	case fullDiskNothing:
		return 0, syscall.ENOSPC
	}
	return f.File.Write(p)
}

func (f faultyFile) Sync() error {
	if fault(f.mode.Load()) == syncFails {
		return syscall.EIO
	}
	return f.File.Sync()
}

func TestWriteFaults(t *testing.T) {
	for _, tt := range []struct {
		name  string
		fault fault
		errno syscall.Errno
	}{
		{"full disk after a partial write", fullDiskPartial, syscall.ENOSPC},
		{"full disk", fullDiskNothing, syscall.ENOSPC},
		{"fsync fails", syncFails, syscall.EIO},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			var mode atomic.Int32
			reg := prometheus.NewRegistry()
			cfg := audit.Config{
				Dir:             dir,
				Signer:          newSigner(t, "ecdsa-p256"),
				CheckpointEvery: 5,
				Metrics:         reg,
				OpenFile: func(name string, flag int, perm fs.FileMode) (audit.File, error) {
					f, err := os.OpenFile(name, flag, perm)
					if err != nil {
						return nil, err
					}
					return faultyFile{File: f, mode: &mode}, nil
				},
			}
			l := start(t, cfg)
			for i := range 7 {
				mustAppend(t, l, gen(i))
			}
			seg := segments(t, dir)[0]
			before := fileSize(t, seg)

			mode.Store(int32(tt.fault))
			const n = 10
			errs := make([]error, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() { _, errs[i] = l.Append(context.Background(), gen(100+i)) })
			}
			wg.Wait()
			for i, err := range errs {
				if !errors.Is(err, audit.ErrUnavailable) || !errors.Is(err, tt.errno) {
					t.Errorf("append %d during the fault = %v, want ErrUnavailable wrapping %v", i, err, tt.errno)
				}
			}
			if got := fileSize(t, seg); got != before {
				t.Errorf("segment is %d bytes after the failed writes, want it cut back to %d", got, before)
			}

			mode.Store(int32(noFault))
			// 7 records and a checkpoint made seqs 1 to 8, with 2 records
			// unsigned: the chain goes on from there as if nothing failed.
			for i := range n {
				want := uint64(9 + i + (i+2)/5)
				if r := mustAppend(t, l, gen(200+i)); r.Seq != want {
					t.Errorf("append %d after the fault got seq %d, want %d", i, r.Seq, want)
				}
			}
			if got := counter(t, reg, "meshca_audit_unavailable_total"); got == 0 {
				t.Error("write failures not counted")
			}
			l.Close()

			ro, err := audit.OpenReadOnly(dir)
			if err != nil {
				t.Fatal(err)
			}
			rep := mustVerify(t, ro)
			if rep.Records != 7+1+n+2 {
				t.Errorf("ledger holds %d records, want %d", rep.Records, 7+1+n+2)
			}
			for _, r := range all(t, ro, audit.Filter{}) {
				if id := genID(r); id >= 100 && id < 200 {
					t.Errorf("refused record %d is in the ledger at seq %d", id, r.Seq)
				}
			}
		})
	}
}

func fileSize(tb testing.TB, path string) int64 {
	tb.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		tb.Fatal(err)
	}
	return fi.Size()
}

// makeReadOnly stops anyone creating files in dir until the test ends or
// the returned function runs. Root ignores permissions, so as root it makes
// the directory immutable instead.
func makeReadOnly(t *testing.T, dir string) (restore func()) {
	t.Helper()
	if err := os.Chmod(dir, 0o500); err != nil {
		t.Fatal(err)
	}
	undo := func() { os.Chmod(dir, 0o700) }
	probe := filepath.Join(dir, "probe")
	if f, err := os.Create(probe); err == nil {
		f.Close()
		os.Remove(probe)
		out, err := exec.Command("chattr", "+i", dir).CombinedOutput()
		if err != nil {
			undo()
			t.Fatalf("cannot make a directory read-only for this user (root needs chattr and CAP_LINUX_IMMUTABLE): %v %s", err, out)
		}
		undo = func() {
			exec.Command("chattr", "-i", dir).Run()
			os.Chmod(dir, 0o700)
		}
	}
	var once sync.Once
	t.Cleanup(func() { once.Do(undo) })
	return func() { once.Do(undo) }
}

func TestReadOnlyDirectory(t *testing.T) {
	for _, tt := range []struct {
		name    string
		records int // appended before the directory turns read-only
	}{
		{"new ledger", 0},
		{"segment rotation", 3},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			// One record per segment: every append creates a file.
			l := start(t, audit.Config{Dir: dir, SegmentBytes: 1})
			for i := range tt.records {
				mustAppend(t, l, gen(i))
			}

			restore := makeReadOnly(t, dir)
			for i := range 3 {
				if _, err := l.Append(t.Context(), gen(100+i)); !errors.Is(err, audit.ErrUnavailable) {
					t.Fatalf("Append into a read-only directory = %v, want ErrUnavailable", err)
				}
			}
			restore()

			for i := range 3 {
				if r := mustAppend(t, l, gen(200+i)); r.Seq != uint64(tt.records+1+i) {
					t.Errorf("append after the fault got seq %d, want %d", r.Seq, tt.records+1+i)
				}
			}
			l.Close()
			ro, err := audit.OpenReadOnly(dir)
			if err != nil {
				t.Fatal(err)
			}
			if rep := mustVerify(t, ro); rep.Records != tt.records+3 || rep.Segments != tt.records+3 {
				t.Errorf("report %+v, want %d records in as many segments", rep, tt.records+3)
			}
		})
	}
}
