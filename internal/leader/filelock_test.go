package leader_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/internal/leader"
	"github.com/meshca/meshca/internal/testenv"
)

const retry = time.Second

// childLockEnv makes the test binary a child process that takes the file
// lock at its path, says "leading" and holds the lock until killed.
const childLockEnv = "MESHCA_LEADER_TEST_CHILD_LOCK"

func TestMain(m *testing.M) {
	if path := os.Getenv(childLockEnv); path != "" {
		holdLockUntilKilled(path)
	}
	os.Exit(m.Run())
}

func holdLockUntilKilled(path string) {
	l, err := leader.NewFileLock(leader.FileLockConfig{Path: path, Identity: "child", RetryPeriod: 10 * time.Millisecond})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	errc := make(chan error, 1)
	go func() { errc <- l.Run(context.Background()) }()
	for ch := l.Changed(); !l.IsLeader(); ch = l.Changed() {
		select {
		case <-ch:
		case err := <-errc:
			fmt.Fprintln(os.Stderr, "Run:", err)
			os.Exit(2)
		}
	}
	fmt.Println("leading")
	fmt.Fprintln(os.Stderr, "Run:", <-errc) // never returns: the lock is held until SIGKILL
	os.Exit(2)
}

type fileCandidate struct {
	*leader.FileLock
	reg *prometheus.Registry
}

func newFileLock(t *testing.T, path, id string, clock clockwork.Clock) *fileCandidate {
	t.Helper()
	reg := prometheus.NewRegistry()
	l, err := leader.NewFileLock(leader.FileLockConfig{Path: path, Identity: id, RetryPeriod: retry, Clock: clock, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	return &fileCandidate{FileLock: l, reg: reg}
}

// tick fires the retry tickers once waiters of them are waiting.
func tick(t *testing.T, clock *clockwork.FakeClock, waiters int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if err := clock.BlockUntilContext(ctx, waiters); err != nil {
		t.Fatalf("waiting for %d tickers: %v", waiters, err)
	}
	clock.Advance(retry)
}

func waitUntil(t *testing.T, what string, ok func() bool) {
	t.Helper()
	testenv.Eventually(t, what, func() error {
		if !ok() {
			return fmt.Errorf("not yet")
		}
		return nil
	})
}

func fileContent(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestFileLockOneLeadsAndClosingHandsOver(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leader.lock")
	clock := clockwork.NewFakeClock()
	a := newFileLock(t, path, "a", clock)
	b := newFileLock(t, path, "b", clock)

	stopA := run(t, a)
	waitUntil(t, "a leads", a.IsLeader)
	run(t, b)
	// b learns the holder only from a failed attempt.
	waitUntil(t, "b sees a as leader", func() bool { return b.Leader() == "a" })
	if b.IsLeader() || !a.IsLeader() {
		t.Fatalf("a leads %v, b leads %v; want a only", a.IsLeader(), b.IsLeader())
	}
	if got := fileContent(t, path); got != "a\n" {
		t.Errorf("lock file holds %q, want a's identity", got)
	}

	changed := b.Changed()
	stopA()
	if a.IsLeader() || a.Leader() == "a" {
		t.Errorf("a stopped but IsLeader = %v, Leader = %q", a.IsLeader(), a.Leader())
	}
	tick(t, clock, 1)
	waitUntil(t, "b leads", b.IsLeader)
	if got := b.Leader(); got != "b" {
		t.Errorf("b.Leader() = %q, want b", got)
	}
	assertClosed(t, "b", changed)
	if got := fileContent(t, path); got != "b\n" {
		t.Errorf("lock file holds %q, want b's identity", got)
	}
	assertMetrics(t, "a", a.reg, 0, 2)
	assertMetrics(t, "b", b.reg, 1, 1)
}

func TestFileLockKilledHolderIsReplaced(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leader.lock")
	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), childLockEnv+"="+path)
	child.Stderr = os.Stderr
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	waited := false
	t.Cleanup(func() {
		if !waited {
			_ = child.Process.Kill()
			_ = child.Wait()
		}
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "leading" {
		t.Fatalf("child: read %q, %v; want \"leading\"", line, err)
	}

	clock := clockwork.NewFakeClock()
	p := newFileLock(t, path, "parent", clock)
	run(t, p)
	waitUntil(t, "parent sees the child as leader", func() bool { return p.Leader() == "child" })
	if p.IsLeader() {
		t.Fatal("parent leads while the child holds the lock")
	}

	if err := child.Process.Kill(); err != nil { // SIGKILL: no clean-up runs
		t.Fatal(err)
	}
	_ = child.Wait() // reaped: the kernel has closed its files
	waited = true
	tick(t, clock, 1)
	waitUntil(t, "parent leads", p.IsLeader)
	if got := p.Leader(); got != "parent" {
		t.Errorf("Leader() = %q, want parent", got)
	}
}

func TestFileLockLeaderStepsDownWhenFileReplaced(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leader.lock")
	clock := clockwork.NewFakeClock()
	a := newFileLock(t, path, "a", clock)
	run(t, a)
	waitUntil(t, "a leads", a.IsLeader)

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	tick(t, clock, 1)
	waitUntil(t, "a steps down", func() bool { return !a.IsLeader() })

	b := newFileLock(t, path, "b", clock)
	run(t, b)
	waitUntil(t, "b leads on the new file", b.IsLeader)
	tick(t, clock, 2)
	waitUntil(t, "a sees b as leader", func() bool { return a.Leader() == "b" })
	if a.IsLeader() {
		t.Error("a leads again while b holds the new file")
	}
	assertMetrics(t, "a", a.reg, 0, 2)
}

func TestFileLockRunFailsOnUnusablePath(t *testing.T) {
	l, err := leader.NewFileLock(leader.FileLockConfig{Path: filepath.Join(t.TempDir(), "missing-dir", "leader.lock")})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Run(t.Context()); err == nil || !strings.HasPrefix(err.Error(), "leader: ") {
		t.Fatalf("Run = %v, want a leader: error", err)
	}
	if l.IsLeader() {
		t.Error("leads after failing")
	}
	if _, err := leader.NewFileLock(leader.FileLockConfig{}); err == nil {
		t.Error("NewFileLock without a path: no error")
	}
}
