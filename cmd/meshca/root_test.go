package main

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/rotation"
)

// TestRotateWaitsAfterARefusal: `meshca root rotate` against a replica that
// refuses every step (a follower, say) asks again once per --poll and says
// why once, instead of spinning on the admin API.
func TestRotateWaitsAfterARefusal(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "admin.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	// The handler stops the command at its third try; three tries take
	// two waits of at least a poll each.
	const poll, tries = 20 * time.Millisecond, 3
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var steps atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.Method == http.MethodGet {
			json.NewEncoder(w).Encode(rotation.Status{Phase: ca.PhaseIdle, Roots: []rotation.Root{{Fingerprint: "aa", Slot: rotation.SlotCurrent}}})
			return
		}
		if steps.Add(1) == tries {
			cancel()
		}
		w.WriteHeader(http.StatusConflict)
		json.NewEncoder(w).Encode(admin.ErrorBody{Error: "rotation: not the leader: other leads; run the step there", Code: "conflict"})
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })

	var out strings.Builder
	began := time.Now()
	if err := rotateRoot(ctx, admin.NewUnixClient(sock), &out, 0, poll); err == nil {
		t.Fatal("rotate against a replica that refuses every step succeeded")
	}
	if took := time.Since(began); took < (tries-1)*poll {
		t.Errorf("%d prepare requests in %v with --poll %v: it did not wait between them", tries, took, poll)
	}
	if n := strings.Count(out.String(), "prepare refused"); n != 1 {
		t.Errorf("the refusal was printed %d times:\n%s", n, out.String())
	}
}
