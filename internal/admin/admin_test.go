package admin_test

import (
	"context"
	"errors"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/sds"
)

type env struct {
	auth   *ca.Authority
	ledger *audit.Ledger
	client *admin.Client
	socket string
	failOn *failSwitch
}

// failSwitch makes segment writes fail on demand, as a full disk does.
type failSwitch struct{ on bool }

type failingFile struct {
	*os.File
	sw *failSwitch
}

func (f failingFile) Write(p []byte) (int, error) {
	if f.sw.on {
		return 0, syscall.ENOSPC
	}
	return f.File.Write(p)
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{failOn: &failSwitch{}}
	e.auth = catest.NewAuthority(t, nil)
	var err error
	e.ledger, err = audit.New(audit.Config{Dir: filepath.Join(t.TempDir(), "audit"),
		OpenFile: func(name string, flag int, perm fs.FileMode) (audit.File, error) {
			f, err := os.OpenFile(name, flag, perm)
			if err != nil {
				return nil, err
			}
			return failingFile{File: f, sw: e.failOn}, nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := sds.New(sds.Config{Source: sds.NewBroadcaster()})
	if err != nil {
		t.Fatal(err)
	}
	rot, err := rotation.New(rotation.Config{CA: e.auth, Proxies: srv, Ledger: rotation.LedgerFunc(
		func(context.Context, time.Time) ([]rotation.Holding, error) { return nil, nil })})
	if err != nil {
		t.Fatal(err)
	}
	e.socket = serveAdmin(t, e.ledger, admin.RootRoutes(rot))
	e.client = admin.NewUnixClient(e.socket)
	return e
}

// serveAdmin runs ledger, and an admin server with routes and the local
// authorizer on a real Unix socket, until the test ends; it returns the
// socket's path. The ledger is closed at the end.
func serveAdmin(t *testing.T, ledger *audit.Ledger, routes []admin.Route) string {
	t.Helper()
	a, err := admin.New(admin.Config{Routes: routes, Local: admin.LocalAuthorizer{}, Ledger: ledger})
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(t.TempDir(), "admin", "admin.sock")
	l, err := a.ListenUnix(socket)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := ledger.Run(ctx); err != nil {
			t.Errorf("ledger Run: %v", err)
		}
	})
	wg.Go(func() {
		if err := a.Serve(ctx, l); err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		ledger.Close()
	})
	return socket
}

// adminRecords are the admin records in l, oldest first.
func adminRecords(t *testing.T, l *audit.Ledger) []audit.Record {
	t.Helper()
	var out []audit.Record
	for r, err := range l.Query(context.Background(), audit.Filter{Kinds: []audit.Kind{audit.KindAdmin}}) {
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func TestSocketPermissions(t *testing.T) {
	e := newEnv(t)
	for path, want := range map[string]fs.FileMode{e.socket: 0o600, filepath.Dir(e.socket): 0o700} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != want {
			t.Errorf("%s has mode %v, want %v", path, got, want)
		}
	}
}

func TestRootStepsOverTheSocket(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	var st rotation.Status
	if err := e.client.Do(ctx, http.MethodGet, "/v1/roots", nil, &st); err != nil {
		t.Fatal(err)
	}
	if st.Phase != ca.PhaseIdle || len(st.Roots) != 1 || st.Roots[0].Slot != rotation.SlotCurrent {
		t.Fatalf("status: %+v", st)
	}
	if got := adminRecords(t, e.ledger); len(got) != 0 {
		t.Errorf("reading the status wrote %d admin records, want none", len(got))
	}

	if err := e.client.Do(ctx, http.MethodPost, "/v1/roots/prepare", admin.StepRequest{}, &st); err != nil {
		t.Fatal(err)
	}
	if st.Phase != ca.PhasePrepared || len(st.Roots) != 2 {
		t.Fatalf("after prepare: %+v", st)
	}
	recs := adminRecords(t, e.ledger)
	if len(recs) != 2 || recs[0].Result != "started" || recs[1].Result != "ok" {
		t.Fatalf("prepare wrote %d admin records %+v, want started then ok", len(recs), recs)
	}
	for _, r := range recs {
		if r.Action != "roots.rotate" || r.Target != "roots/prepare" || !strings.HasPrefix(r.Actor, "unix:uid=") {
			t.Errorf("admin record: action %q target %q actor %q", r.Action, r.Target, r.Actor)
		}
	}

	// A second prepare is refused with the state it found, and audited.
	err := e.client.Do(ctx, http.MethodPost, "/v1/roots/prepare", admin.StepRequest{}, &st)
	var apiErr *admin.APIError
	if !errors.As(err, &apiErr) || apiErr.HTTPStatus != http.StatusConflict || !strings.Contains(apiErr.Body.Error, "already prepared") {
		t.Fatalf("second prepare: %v", err)
	}
	if recs := adminRecords(t, e.ledger); len(recs) != 4 || recs[3].Result != "failed" || !strings.Contains(recs[3].Detail, "already prepared") {
		t.Errorf("refused prepare: records %+v", recs)
	}

	// A misspelt option is refused, not ignored.
	err = e.client.Do(ctx, http.MethodPost, "/v1/roots/activate", map[string]any{"forse": true}, nil)
	if !errors.As(err, &apiErr) || apiErr.HTTPStatus != http.StatusBadRequest || !strings.Contains(apiErr.Body.Error, "forse") {
		t.Fatalf("misspelt option: %v", err)
	}
	if r, _ := e.auth.Rotation(); r.Phase != ca.PhasePrepared {
		t.Fatalf("a refused request changed the phase to %s", r.Phase)
	}
	if err := e.client.Do(ctx, http.MethodPost, "/v1/roots/activate", admin.StepRequest{}, &st); err != nil {
		t.Fatal(err)
	}
	if st.Phase != ca.PhaseActivated {
		t.Fatalf("after activate: %+v", st)
	}
}

// With the ledger unable to write, a change is refused before it is made.
func TestNothingHappensUnaudited(t *testing.T) {
	e := newEnv(t)
	e.failOn.on = true
	err := e.client.Do(context.Background(), http.MethodPost, "/v1/roots/prepare", admin.StepRequest{}, nil)
	var apiErr *admin.APIError
	if !errors.As(err, &apiErr) || apiErr.HTTPStatus != http.StatusServiceUnavailable ||
		!strings.Contains(apiErr.Body.Error, "audit ledger is unavailable, so nothing was done") {
		t.Fatalf("prepare with a failing ledger: %v", err)
	}
	if r, _ := e.auth.Rotation(); r.Phase != ca.PhaseIdle {
		t.Fatalf("prepare went ahead without an audit record: phase %s", r.Phase)
	}
	e.failOn.on = false
	if err := e.client.Do(context.Background(), http.MethodPost, "/v1/roots/prepare", admin.StepRequest{}, nil); err != nil {
		t.Fatalf("prepare once the ledger recovered: %v", err)
	}
}
