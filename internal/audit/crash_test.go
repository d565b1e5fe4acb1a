package audit_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"

	"github.com/meshca/meshca/internal/audit"
)

const (
	crashDirEnv  = "MESHCA_AUDIT_CRASH_DIR"
	crashBaseEnv = "MESHCA_AUDIT_CRASH_BASE"
)

// TestCrash kills a process appending from several goroutines with SIGKILL,
// at whatever point it is, and checks that every append it was told was
// durable is in the ledger, with the right content, and that the ledger
// verifies and takes appends again.
func TestCrash(t *testing.T) {
	const crashes = 5
	dir := t.TempDir()
	acked := make(map[uint64]int) // seq → gen id
	for round := range crashes {
		for seq, id := range runUntilKilled(t, dir, round, 100+40*round) {
			acked[seq] = id
		}
		if segs := segments(t, dir); len(segs) > 0 {
			if b := readFile(t, segs[len(segs)-1]); len(b) > 0 && b[len(b)-1] != '\n' {
				t.Logf("crash %d interrupted a write: the last segment ends in a torn record", round)
			}
		}

		l, err := audit.New(audit.Config{Dir: dir})
		if err != nil {
			t.Fatalf("crash %d: reopening: %v", round, err)
		}
		rep := mustVerify(t, l)
		got := make(map[uint64]int)
		for _, r := range all(t, l, audit.Filter{}) {
			got[r.Seq] = genID(r)
		}
		for seq, id := range acked {
			if gotID, ok := got[seq]; !ok || gotID != id {
				t.Errorf("crash %d: acknowledged seq %d (record %d) lost: ledger holds record %d there (present: %v)",
					round, seq, id, gotID, ok)
			}
		}
		t.Logf("crash %d: %d records acknowledged so far, ledger holds %d in %d segments",
			round, len(acked), rep.Records, rep.Segments)
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// runUntilKilled runs TestHelperProcess on dir, SIGKILLs it once it has
// acknowledged at least n appends, and returns every seq it acknowledged.
func runUntilKilled(t *testing.T, dir string, round, n int) map[uint64]int {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), crashDirEnv+"="+dir, crashBaseEnv+"="+strconv.Itoa(1_000_000*(round+1)))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	acked := make(map[uint64]int)
	sc := bufio.NewScanner(stdout)
	killed := false
	for sc.Scan() {
		var seq uint64
		var id int
		if _, err := fmt.Sscanf(sc.Text(), "%d %d", &seq, &id); err != nil {
			t.Errorf("child printed %q", sc.Text())
			continue
		}
		acked[seq] = id
		if len(acked) >= n && !killed {
			// SIGKILL: no deferred code, no Close. Lines the child printed
			// before dying are still read below: they were acknowledged.
			if err := cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			killed = true
		}
	}
	cmd.Wait()
	if !killed {
		t.Fatalf("child exited after %d appends:\n%s", len(acked), stderr.Bytes())
	}
	return acked
}

// TestHelperProcess is the child of TestCrash: it appends from 8 goroutines
// until killed, printing "seq id" for each acknowledged append.
func TestHelperProcess(t *testing.T) {
	dir := os.Getenv(crashDirEnv)
	if dir == "" {
		return // not a child of TestCrash
	}
	base, _ := strconv.Atoi(os.Getenv(crashBaseEnv))
	exit := func(err error) {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	l, err := audit.New(audit.Config{
		Dir:             dir,
		SegmentBytes:    8 << 10,
		Signer:          newSigner(t, "ecdsa-p256"),
		CheckpointEvery: 25,
	})
	if err != nil {
		exit(err)
	}
	go func() { exit(l.Run(context.Background())) }()
	var mu sync.Mutex
	for g := range 8 {
		go func() {
			for i := base + g; ; i += 8 {
				r, err := l.Append(context.Background(), gen(i))
				if err != nil {
					exit(err)
				}
				mu.Lock()
				fmt.Printf("%d %d\n", r.Seq, i)
				mu.Unlock()
			}
		}()
	}
	select {}
}

// TestTornTail lays out what a writer killed mid-write leaves and checks
// that New cuts it off, without touching acknowledged records.
func TestTornTail(t *testing.T) {
	fragment := []byte(`{"seq":6,"time":"2030-01-01T00:00:00Z","kind":"iss`)
	for _, tt := range []struct {
		name   string
		damage func(t *testing.T, dir, seg string)
	}{
		{"partial record at the end", func(t *testing.T, _, seg string) {
			appendFile(t, seg, fragment)
		}},
		{"partial record alone in a new segment", func(t *testing.T, dir, _ string) {
			appendFile(t, filepath.Join(dir, fmt.Sprintf("seg-%020d.log", 6)), fragment)
		}},
		{"empty new segment", func(t *testing.T, dir, _ string) {
			appendFile(t, filepath.Join(dir, fmt.Sprintf("seg-%020d.log", 6)), nil)
		}},
		{"temp file of an interrupted head.json write", func(t *testing.T, dir, _ string) {
			appendFile(t, filepath.Join(dir, ".tmp-head.json-12345"), []byte(`{"seq":`))
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			l := start(t, audit.Config{Dir: dir})
			for i := range 5 {
				mustAppend(t, l, gen(i))
			}
			l.Close()
			seg := segments(t, dir)[0]
			clean, err := os.ReadFile(seg)
			if err != nil {
				t.Fatal(err)
			}
			tt.damage(t, dir, seg)

			// A read-only open changes nothing and leaves the tail out.
			ro, err := audit.OpenReadOnly(dir)
			if err != nil {
				t.Fatal(err)
			}
			if rep := mustVerify(t, ro); rep.Records != 5 {
				t.Errorf("read-only view holds %d records, want 5", rep.Records)
			}

			l = start(t, audit.Config{Dir: dir})
			if r := mustAppend(t, l, gen(5)); r.Seq != 6 {
				t.Errorf("append after the repair got seq %d, want 6", r.Seq)
			}
			l.Close()
			got, err := os.ReadFile(seg)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(got, clean) || bytes.Contains(got, fragment) {
				t.Errorf("segment after repair:\n%s\nwant the 5 records and the new one", got)
			}
			entries, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, e := range entries {
				names = append(names, e.Name())
			}
			if want := []string{filepath.Base(seg)}; !slices.Equal(names, want) {
				t.Errorf("directory holds %q, want %q", names, want)
			}
			ro, err = audit.OpenReadOnly(dir)
			if err != nil {
				t.Fatal(err)
			}
			if rep := mustVerify(t, ro); rep.Records != 6 {
				t.Errorf("ledger holds %d records, want 6", rep.Records)
			}
		})
	}
}

func appendFile(t *testing.T, path string, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestCorruptTailRefused: a damaged last record that is not a torn write
// (it ends with a newline) is evidence, not debris. New refuses to append
// after it instead of cutting it off.
func TestCorruptTailRefused(t *testing.T) {
	dir := t.TempDir()
	l := start(t, audit.Config{Dir: dir})
	for i := range 3 {
		mustAppend(t, l, gen(i))
	}
	l.Close()
	seg := segments(t, dir)[0]
	ls := lines(t, seg)
	ls[2] = ls[2][:len(ls[2])/2]
	writeLines(t, seg, ls)

	if _, err := audit.New(audit.Config{Dir: dir}); !errors.Is(err, audit.ErrCorrupt) {
		t.Fatalf("New on a ledger with a corrupt last record = %v, want ErrCorrupt", err)
	}
	ro, err := audit.OpenReadOnly(dir)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := ro.Verify(t.Context(), audit.VerifyOptions{})
	if !errors.Is(err, audit.ErrTampered) || rep.Failure == nil || rep.Failure.Seq != 3 || rep.Failure.Line != 3 {
		t.Errorf("Verify = %v, %+v; want a failure at seq 3, line 3", err, rep.Failure)
	}
}
