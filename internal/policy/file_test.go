package policy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/internal/policy"
)

const pollInterval = 5 * time.Second

// Environment of a child process that adds exclusions to a policy file;
// see TestMain.
const (
	envWriterPath  = "MESHCA_POLICY_TEST_WRITER_PATH"
	envWriterName  = "MESHCA_POLICY_TEST_WRITER_NAME"
	envWriterCount = "MESHCA_POLICY_TEST_WRITER_COUNT"
)

func TestMain(m *testing.M) {
	if path := os.Getenv(envWriterPath); path != "" {
		if err := runWriter(path, os.Getenv(envWriterName), os.Getenv(envWriterCount)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func runWriter(path, name, count string) error {
	n, err := strconv.Atoi(count)
	if err != nil {
		return err
	}
	s, err := policy.NewFileStore(policy.FileConfig{Path: path})
	if err != nil {
		return err
	}
	for i := range n {
		if _, err := s.Update(context.Background(), addExcluded(fmt.Sprintf("%s-%d.example", name, i))); err != nil {
			return err
		}
	}
	return nil
}

func addExcluded(names ...string) func(policy.Policy) (policy.Policy, error) {
	return func(p policy.Policy) (policy.Policy, error) {
		p.Excluded = append(p.Excluded, names...)
		return p, nil
	}
}

type fileEnv struct {
	path  string
	clock *clockwork.FakeClock
	reg   *prometheus.Registry
	store *policy.FileStore
	ctx   context.Context
}

// newFileEnv makes a FileStore on a fake clock. It does not run it.
func newFileEnv(t *testing.T, path string) *fileEnv {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "policy.json")
	}
	e := &fileEnv{path: path, clock: clockwork.NewFakeClock(), reg: prometheus.NewRegistry(), ctx: t.Context()}
	s, err := policy.NewFileStore(policy.FileConfig{
		Path: path, PollInterval: pollInterval, Clock: e.clock, Metrics: policy.NewMetrics(e.reg),
	})
	if err != nil {
		t.Fatal(err)
	}
	e.store = s
	return e
}

// run starts Run and waits for its first poll to finish.
func (e *fileEnv) run(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() { done <- e.store.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	e.waitIdle(t)
}

// waitIdle returns once Run waits for its next poll.
func (e *fileEnv) waitIdle(t *testing.T) {
	t.Helper()
	if err := e.clock.BlockUntilContext(e.ctx, 1); err != nil {
		t.Fatal(err)
	}
}

// poll makes Run reread the file and waits until it has.
func (e *fileEnv) poll(t *testing.T) {
	t.Helper()
	e.waitIdle(t)
	e.clock.Advance(pollInterval)
	e.waitIdle(t)
}

func (e *fileEnv) write(t *testing.T, content string) {
	t.Helper()
	if err := os.WriteFile(e.path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		m := mf.GetMetric()[0]
		if c := m.GetCounter(); c != nil {
			return c.GetValue()
		}
		return m.GetGauge().GetValue()
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func TestFileStoreMissingIsDefault(t *testing.T) {
	e := newFileEnv(t, "")
	if e.store.Synced() {
		t.Fatal("synced before Run")
	}
	changed := e.store.Changed()
	e.run(t)
	if err := e.store.WaitForSync(t.Context()); err != nil {
		t.Fatal(err)
	}
	// Nothing stored leaves Default in place; the first read is still
	// announced, so a consumer waiting for the store learns it synced.
	select {
	case <-changed:
	default:
		t.Error("the first read did not signal Changed")
	}
	p, rev := e.store.Current()
	if !p.Equal(policy.Default()) || rev != "" {
		t.Errorf("Current = %v, %q; want Default and no revision", p, rev)
	}
	if _, err := os.Stat(e.path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("reading created the file: %v", err)
	}
}

func TestFileStoreUpdateSurvivesRestart(t *testing.T) {
	e := newFileEnv(t, filepath.Join(t.TempDir(), "sub", "policy.json"))
	e.run(t)
	changed := e.store.Changed()
	got, err := e.store.Update(t.Context(), func(p policy.Policy) (policy.Policy, error) {
		if !p.Equal(policy.Default()) {
			t.Errorf("first Update saw %v, want Default", p)
		}
		p.Enabled = true
		p.Excluded = append(p.Excluded, "Legacy.Example.")
		return p, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := policy.Policy{Enabled: true, Mode: policy.ModeStrict, Excluded: []string{policy.DefaultExcluded, "legacy.example"}}
	if !got.Equal(want) || !slices.Equal(got.Excluded, want.Excluded) {
		t.Errorf("Update = %v, want %v", got, want)
	}
	select {
	case <-changed:
	default:
		t.Error("Update did not signal Changed")
	}
	cur, rev := e.store.Current()
	if !cur.Equal(want) || rev == "" {
		t.Errorf("Current = %v, %q", cur, rev)
	}

	// An Update that changes nothing keeps the revision.
	if _, err := e.store.Update(t.Context(), addExcluded("LEGACY.example")); err != nil {
		t.Fatal(err)
	}
	if _, rev2 := e.store.Current(); rev2 != rev {
		t.Errorf("no-op Update moved the revision from %q to %q", rev, rev2)
	}

	restarted := newFileEnv(t, e.path)
	restarted.run(t)
	cur2, rev2 := restarted.store.Current()
	if !cur2.Equal(want) || rev2 != rev {
		t.Errorf("after restart Current = %v, %q; want %v, %q", cur2, rev2, want, rev)
	}
}

func TestFileStoreRejectsInvalidUpdate(t *testing.T) {
	e := newFileEnv(t, "")
	e.run(t)
	if _, err := e.store.Update(t.Context(), addExcluded("good.example")); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(e.path)
	if err != nil {
		t.Fatal(err)
	}
	_, rev := e.store.Current()

	_, err = e.store.Update(t.Context(), addExcluded("fine.example", "bad_name.example"))
	if !errors.Is(err, policy.ErrInvalid) || !strings.Contains(err.Error(), `"bad_name.example"`) {
		t.Errorf("Update with a bad name = %v; want ErrInvalid naming it", err)
	}
	boom := errors.New("boom")
	if _, err := e.store.Update(t.Context(), func(policy.Policy) (policy.Policy, error) { return policy.Policy{}, boom }); !errors.Is(err, boom) {
		t.Errorf("Update whose mutate fails = %v, want %v", err, boom)
	}

	after, err := os.ReadFile(e.path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Errorf("file changed by failed updates:\n%s\nthen\n%s", before, after)
	}
	cur, rev2 := e.store.Current()
	if rev2 != rev || slices.Contains(cur.Excluded, "fine.example") {
		t.Errorf("failed update half-applied: %v at %q", cur, rev2)
	}
}

func TestFileStorePicksUpEdits(t *testing.T) {
	e := newFileEnv(t, "")
	e.run(t)

	changed := e.store.Changed()
	e.write(t, `{"enabled": true, "mode": "PERMISSIVE", "excludedServices": ["a.example"]}`)
	e.poll(t)
	<-changed
	cur, rev := e.store.Current()
	if !cur.Equal(policy.Policy{Enabled: true, Mode: policy.ModePermissive, Excluded: []string{"a.example"}}) || rev == "" {
		t.Fatalf("after a hand edit Current = %v, %q", cur, rev)
	}

	// A poll that finds nothing new changes nothing.
	changed = e.store.Changed()
	e.poll(t)
	select {
	case <-changed:
		t.Error("Changed closed without a change")
	default:
	}

	// A malformed edit is reported, and the last good policy stays.
	e.write(t, `{"enabled": true, "excludedServices": ["a.example", "no good"]}`)
	e.poll(t)
	e.poll(t) // seen twice, counted once
	cur2, rev2 := e.store.Current()
	if !cur2.Equal(cur) || rev2 != rev {
		t.Errorf("after a malformed edit Current = %v, %q; want %v, %q", cur2, rev2, cur, rev)
	}
	st := e.store.Status()
	if !errors.Is(st.Err, policy.ErrInvalid) || !strings.Contains(st.Err.Error(), `"no good"`) || st.Revision != rev || st.ErrRevision == "" {
		t.Errorf("Status = %+v", st)
	}
	if v := metricValue(t, e.reg, "meshca_policy_parse_errors_total"); v != 1 {
		t.Errorf("parse errors = %v, want 1", v)
	}
	if v := metricValue(t, e.reg, "meshca_policy_source_valid"); v != 0 {
		t.Errorf("source valid = %v, want 0", v)
	}
	if _, err := e.store.Update(t.Context(), addExcluded("b.example")); !errors.Is(err, policy.ErrMalformed) {
		t.Errorf("Update over a malformed file = %v, want refusal", err)
	}

	// Fixing the file clears the error.
	changed = e.store.Changed()
	e.write(t, `{"enabled": true, "excludedServices": ["c.example"]}`)
	e.poll(t)
	<-changed
	if st := e.store.Status(); st.Err != nil {
		t.Errorf("Status after the fix = %+v", st)
	}
	if v := metricValue(t, e.reg, "meshca_policy_source_valid"); v != 1 {
		t.Errorf("source valid = %v, want 1", v)
	}

	// Removing the file is the default policy.
	changed = e.store.Changed()
	if err := os.Remove(e.path); err != nil {
		t.Fatal(err)
	}
	e.poll(t)
	<-changed
	if cur, rev := e.store.Current(); !cur.Equal(policy.Default()) || rev != "" {
		t.Errorf("after removal Current = %v, %q", cur, rev)
	}
}

func TestFileStoreMalformedAtStart(t *testing.T) {
	e := newFileEnv(t, "")
	e.write(t, "enabled: true\n")
	e.run(t)
	if e.store.Synced() {
		t.Fatal("synced on a malformed file")
	}
	if st := e.store.Status(); st.Err == nil {
		t.Fatalf("Status = %+v, want the parse error", st)
	}
	e.write(t, `{"enabled": true}`)
	e.poll(t)
	if err := e.store.WaitForSync(t.Context()); err != nil {
		t.Fatal(err)
	}
	if cur, _ := e.store.Current(); !cur.Enabled || len(cur.Excluded) != 0 {
		t.Errorf("Current = %v", cur)
	}
}

func TestFileStoreHandEditDuringUpdate(t *testing.T) {
	e := newFileEnv(t, "")
	calls := 0
	got, err := e.store.Update(t.Context(), func(p policy.Policy) (policy.Policy, error) {
		calls++
		if calls == 1 {
			// Someone saves the file by hand while this update is
			// being computed.
			e.write(t, `{"enabled": true, "excludedServices": ["by-hand.example"]}`)
		}
		p.Excluded = append(p.Excluded, "by-api.example")
		return p, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := policy.Policy{Enabled: true, Excluded: []string{"by-api.example", "by-hand.example"}}
	if calls != 2 || !got.Equal(want) {
		t.Errorf("Update = %v after %d calls; want %v after 2", got, calls, want)
	}
	if v := metricValue(t, e.reg, "meshca_policy_update_conflicts_total"); v != 1 {
		t.Errorf("conflicts = %v, want 1", v)
	}
}

func TestFileStoreConcurrentUpdatesInProcess(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.json")
	// Two stores on one file behave like two processes, except for the
	// in-process mutex, which each has its own of.
	stores := []*policy.FileStore{newFileEnv(t, path).store, newFileEnv(t, path).store}
	const writers, each = 8, 10
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				if _, err := stores[w%2].Update(t.Context(), addExcluded(fmt.Sprintf("w%d-%d.example", w, i))); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	checkAllWritten(t, path, writers, each, "w")
}

func TestFileStoreConcurrentUpdatesAcrossProcesses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.json")
	const procs, each = 4, 15
	cmds := make([]*exec.Cmd, procs)
	outs := make([]bytes.Buffer, procs)
	for i := range procs {
		cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(),
			envWriterPath+"="+path, envWriterName+"=p"+strconv.Itoa(i), envWriterCount+"="+strconv.Itoa(each))
		cmd.Stdout, cmd.Stderr = &outs[i], &outs[i]
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds[i] = cmd
	}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Errorf("writer %d: %v\n%s", i, err, outs[i].String())
		}
	}
	checkAllWritten(t, path, procs, each, "p")
}

// checkAllWritten reads path with a fresh store and checks every update
// of every writer is there.
func checkAllWritten(t *testing.T, path string, writers, each int, prefix string) {
	t.Helper()
	e := newFileEnv(t, path)
	e.run(t)
	cur, _ := e.store.Current()
	want := []string{policy.DefaultExcluded}
	for w := range writers {
		for i := range each {
			want = append(want, fmt.Sprintf("%s%d-%d.example", prefix, w, i))
		}
	}
	slices.Sort(want)
	if !slices.Equal(cur.Excluded, want) {
		missing := 0
		for _, n := range want {
			if !slices.Contains(cur.Excluded, n) {
				missing++
			}
		}
		t.Errorf("%d of %d exclusions lost", missing, len(want))
	}
}

func TestStatic(t *testing.T) {
	s, err := policy.Static(policy.Policy{Enabled: true, Excluded: []string{"A.example."}})
	if err != nil {
		t.Fatal(err)
	}
	p, _ := s.Current()
	if p.ModeFor("a.example") != policy.ModeDisable || p.ModeFor("b.example") != policy.ModeStrict {
		t.Errorf("Static = %v", p)
	}
	p.Excluded[0] = "changed.example"
	if again, _ := s.Current(); again.Excluded[0] != "a.example" {
		t.Errorf("Current shares its slice: %v", again)
	}
	if _, err := policy.Static(policy.Policy{Mode: "bogus"}); !errors.Is(err, policy.ErrInvalid) {
		t.Errorf("Static of an invalid policy = %v", err)
	}
}
