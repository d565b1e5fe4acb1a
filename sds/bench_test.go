package sds_test

import (
	"bufio"
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// The benchmark's proxies run in a child process (this test binary again,
// told so by the environment), so the server's heap and goroutines can be
// measured alone.
const (
	fleetTargetEnv  = "MESHCA_SDS_FLEET_TARGET"
	fleetStreamsEnv = "MESHCA_SDS_FLEET_STREAMS"
	fleetPerConnEnv = "MESHCA_SDS_FLEET_PER_CONN"
)

func TestMain(m *testing.M) {
	if target := os.Getenv(fleetTargetEnv); target != "" {
		os.Exit(runFleet(target))
	}
	os.Exit(m.Run())
}

// runFleet is the child: it opens the streams, says "ready", ACKs until
// its stdin closes.
func runFleet(target string) int {
	n, _ := strconv.Atoi(os.Getenv(fleetStreamsEnv))
	perConn, _ := strconv.Atoi(os.Getenv(fleetPerConnEnv))
	f, err := sdstest.StartFleet(context.Background(), sdstest.FleetConfig{Target: target, Streams: n, StreamsPerConn: perConn})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	if err := f.Close(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// BenchmarkPushToStreams measures a trust-bundle change reaching N
// connected proxies: ns/op is the time from Broadcaster.Set until
// Server.Acked reports every stream has ACKed the new root. heap-B/stream
// and goroutines/stream are the server process's growth with N streams
// open and settled (after GC), gRPC's transport included. conns is how many
// connections carry the N streams: one per proxy, as Envoys connect, or
// shared, to separate the cost of a stream from that of a connection.
func BenchmarkPushToStreams(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		for _, perConn := range []int{1, 100} {
			b.Run(fmt.Sprintf("streams=%d/conns=%d", n, n/perConn), func(b *testing.B) {
				benchmarkPush(b, n, perConn)
			})
		}
	}
}

func benchmarkPush(b *testing.B, n, perConn int) {
	a := catest.NewAuthority(b, nil)
	snap := issue(b, a, web)
	root := snap.Roots[0]
	bc := sds.NewBroadcaster()
	if err := bc.Set(snap); err != nil {
		b.Fatal(err)
	}
	s, err := sds.New(sds.Config{Source: bc})
	if err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(b.TempDir(), "sds.sock")
	lis, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	sdstest.Serve(b, s, lis)

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	goroutines := runtime.NumGoroutine()

	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), fleetTargetEnv+"=unix://"+path,
		fleetStreamsEnv+"="+strconv.Itoa(n), fleetPerConnEnv+"="+strconv.Itoa(perConn))
	child.Stderr = os.Stderr
	stdin, err := child.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := child.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := child.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		stdin.Close()
		if err := child.Wait(); err != nil {
			b.Errorf("fleet: %v", err)
		}
	})
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
		b.Fatalf("fleet did not start: %q %v", line, err)
	}
	waitAcked(b, s, root, n)

	runtime.GC()
	var settled runtime.MemStats
	runtime.ReadMemStats(&settled)
	heap := float64(int64(settled.HeapAlloc)-int64(before.HeapAlloc)) / float64(n)
	perStream := float64(runtime.NumGoroutine()-goroutines) / float64(n)

	// Alternate between two second roots, so every Set is a change.
	extra := []*x509.Certificate{newRoot(b), newRoot(b)}
	i := 0
	for b.Loop() {
		r := extra[i%2]
		i++
		if err := bc.Set(withRoots(snap, root, r)); err != nil {
			b.Fatal(err)
		}
		waitAcked(b, s, r, n)
	}
	// After the loop: b.Loop's start clears metrics reported earlier.
	b.ReportMetric(heap, "heap-B/stream")
	b.ReportMetric(perStream, "goroutines/stream")
}

// waitAcked waits, up to two minutes, until all n streams have ACKed root.
func waitAcked(b *testing.B, s *sds.Server, root *x509.Certificate, n int) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ackedIs(b, ctx, s, s.Acked, ca.Fingerprint(root), n, n)
}

// TestFleet checks the benchmark's load helper in process, on a small
// scale: every fleet stream ACKs the bundle change.
func TestFleet(t *testing.T) {
	protocols(t, func(t *testing.T, delta bool) {
		const n = 20
		ctx := testCtx(t)
		ag := newAgent(t)
		f, err := sdstest.StartFleet(ctx, sdstest.FleetConfig{Target: ag.target, Streams: n, StreamsPerConn: 5, Delta: delta})
		if err != nil {
			t.Fatal(err)
		}
		ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(ag.root), n, n)
		root2 := newRoot(t)
		ag.set(t, withRoots(*ag.b.Snapshot(), ag.root, root2))
		ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(root2), n, n)
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(root2), 0, 0)
	})
}
