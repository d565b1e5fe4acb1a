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
	var steps atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.Method == http.MethodGet {
			json.NewEncoder(w).Encode(rotation.Status{Phase: ca.PhaseIdle, Roots: []rotation.Root{{Fingerprint: "aa", Slot: rotation.SlotCurrent}}})
			return
		}
		steps.Add(1)
		w.WriteHeader(http.StatusConflict)
		json.NewEncoder(w).Encode(admin.ErrorBody{Error: "rotation: not the leader: other leads; run the step there", Code: "conflict"})
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })

	const poll = 20 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 10*poll)
	defer cancel()
	var out strings.Builder
	if err := rotateRoot(ctx, admin.NewUnixClient(sock), &out, 0, poll); err == nil {
		t.Fatal("rotate against a replica that refuses every step succeeded")
	}
	// Each wait is at least one poll, so ten polls' time allows at most
	// eleven tries.
	if n := steps.Load(); n < 1 || n > 11 {
		t.Errorf("%d prepare requests in %v with --poll %v", n, 10*poll, poll)
	}
	if n := strings.Count(out.String(), "prepare refused"); n != 1 {
		t.Errorf("the refusal was printed %d times:\n%s", n, out.String())
	}
}
