package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/internal/testenv/fixture"
	"github.com/meshca/meshca/sds/sdstest"
)

// rotationLeafTTL keeps leaves short, so the old root's last leaf expires,
// and retirement is allowed, within seconds of activation.
const rotationLeafTTL = "20s"

// mesh is a `meshca dev` process on a fixed port, so it can be killed and
// restarted under its agents, with workloads behind those agents that keep
// opening mTLS connections to each other.
type mesh struct {
	t       *testing.T
	dataDir string
	addr    string
	proc    *exec.Cmd
	socket  string
	// extra are more flags for meshca dev.
	extra []string

	workloads []*workload

	stop    context.CancelFunc
	wg      sync.WaitGroup
	tries   atomic.Int64
	mu      sync.Mutex
	failure []string
}

// workload is a proxy stand-in: an Envoy-like SDS client on its agent's
// socket, serving TLS with the secrets it holds and dialing its peers.
type workload struct {
	name string
	sds  *sdstest.Client
	l    net.Listener
}

func freeAddr(t *testing.T) string {
	t.Helper()
	port, err := fixture.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
}

func startMesh(t *testing.T, names ...string) *mesh {
	t.Helper()
	return startMeshWith(t, nil, names...)
}

// startMeshWith is startMesh with more flags for meshca dev.
func startMeshWith(t *testing.T, extra []string, names ...string) *mesh {
	t.Helper()
	m := &mesh{t: t, dataDir: t.TempDir(), addr: freeAddr(t), extra: extra}
	m.socket = filepath.Join(m.dataDir, "admin", "admin.sock")
	m.start()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	t.Cleanup(func() { m.stopTraffic() })
	for _, name := range names {
		m.workloads = append(m.workloads, m.startWorkload(ctx, name))
	}
	return m
}

// start runs meshca dev on the mesh's port and waits for its admin socket.
func (m *mesh) start() {
	m.t.Helper()
	args := append([]string{"--grpc-addr", m.addr, "--leaf-ttl", rotationLeafTTL, "--max-leaf-ttl", rotationLeafTTL}, m.extra...)
	m.proc, _ = meshcaProcess(m.t, m.dataDir, args...)
	// A killed server leaves its socket file behind: wait for an answer.
	testenv.Eventually(m.t, "the admin API", func() error {
		return admin.NewUnixClient(m.socket).Do(context.Background(), "GET", "/v1/roots", nil, nil)
	})
}

// kill stops meshca dev with SIGKILL: no shutdown code runs.
func (m *mesh) kill() {
	m.t.Helper()
	if err := m.proc.Process.Signal(syscall.SIGKILL); err != nil {
		m.t.Fatal(err)
	}
	m.proc.Wait()
}

func (m *mesh) startWorkload(ctx context.Context, name string) *workload {
	t := m.t
	t.Helper()
	tok := writeFile(t, name+".token", []byte(meshcaCmd(t, "dev", "token", "--data-dir", m.dataDir, "-n", "shop", "-s", name)))
	sock := filepath.Join(t.TempDir(), "sds.sock")
	actx, cancel := context.WithCancel(context.Background())
	logs := &syncBuffer{}
	cmd := newRootCommand(io.Discard, logs)
	cmd.SetArgs([]string{"agent", "--addr", m.addr, "--ca-bundle", filepath.Join(m.dataDir, devBundleFile),
		"--token-file", tok, "--socket", sock})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agent %s's log:\n%s", name, logs.String())
		}
	})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(actx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent %s: %v", name, err)
		}
	})
	testenv.Eventually(t, "agent "+name+"'s socket", func() error { _, err := os.Stat(sock); return err })
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := sdstest.New(sdstest.Config{Conn: conn, Node: name})
	// The stream lives as long as ctx; only the wait is bounded.
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Disconnect)
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	defer wcancel()
	if _, err := c.Wait(wctx, func(s sdstest.State) bool { return s.Has("default", "ROOTCA") }); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	w := &workload{name: name, sds: c, l: l}
	m.wg.Go(func() { m.serve(w) })
	return w
}

// serve accepts mTLS connections with the secrets held at each handshake,
// as Envoy does after an SDS push, and echoes one byte.
func (m *mesh) serve(w *workload) {
	for {
		conn, err := w.l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			tc := tls.Server(conn, &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
				return w.sds.TLSConfig()
			}})
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			if err := tc.Handshake(); err != nil {
				m.fail(fmt.Sprintf("%s accepting: %v", w.name, err))
				return
			}
			var b [1]byte
			if _, err := io.ReadFull(tc, b[:]); err == nil {
				tc.Write(b[:])
			}
		}()
	}
}

func (m *mesh) fail(msg string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failure = append(m.failure, time.Now().Format("15:04:05.000")+" "+msg)
}

// startTraffic makes every workload connect to the next one in a loop,
// with a full handshake each time.
func (m *mesh) startTraffic() {
	ctx, cancel := context.WithCancel(context.Background())
	m.stop = cancel
	for i, from := range m.workloads {
		to := m.workloads[(i+1)%len(m.workloads)]
		m.wg.Go(func() {
			for ctx.Err() == nil {
				m.tries.Add(1)
				if err := dialOnce(from, to); err != nil && ctx.Err() == nil {
					m.fail(fmt.Sprintf("%s -> %s: %v", from.name, to.name, err))
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

func dialOnce(from, to *workload) error {
	cfg, err := from.sds.TLSConfig()
	if err != nil {
		return err
	}
	cfg.SessionTicketsDisabled = true
	conn, err := net.DialTimeout("tcp", to.l.Addr().String(), 10*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(conn, cfg)
	if err := tc.Handshake(); err != nil {
		return err
	}
	if _, err := tc.Write([]byte{1}); err != nil {
		return err
	}
	var b [1]byte
	_, err = io.ReadFull(tc, b[:])
	return err
}

func (m *mesh) stopTraffic() {
	if m.stop != nil {
		m.stop()
	}
	for _, w := range m.workloads {
		w.l.Close()
	}
	m.wg.Wait()
}

func (m *mesh) status() rotation.Status {
	m.t.Helper()
	var st rotation.Status
	if err := admin.NewUnixClient(m.socket).Do(context.Background(), "GET", "/v1/roots", nil, &st); err != nil {
		m.t.Fatal(err)
	}
	return st
}

// step takes one rotation step, retrying while its gate is closed (the
// proxies have not caught up yet, or the old root's leaves still live).
func (m *mesh) step(step ca.Step) rotation.Status {
	m.t.Helper()
	var st rotation.Status
	testenv.Eventually(m.t, string(step), func() error {
		return admin.NewUnixClient(m.socket).Do(context.Background(), "POST", "/v1/roots/"+string(step), admin.StepRequest{}, &st)
	})
	return st
}

// checkOnlyRoot asserts that every workload trusts only root and holds a
// certificate that chains to it.
func (m *mesh) checkOnlyRoot(root *x509.Certificate) {
	m.t.Helper()
	for _, w := range m.workloads {
		testenv.Eventually(m.t, w.name+" on the new root only", func() error {
			roots, err := w.sds.Roots()
			if err != nil {
				return err
			}
			if len(roots) != 1 || !roots[0].Equal(root) {
				var fps []string
				for _, r := range roots {
					fps = append(fps, shortFP(ca.Fingerprint(r)))
				}
				st := w.sds.State()
				return fmt.Errorf("%s trusts %v, want only %s (SDS: connected %v, err %v, %d responses, last %+v)", w.name, fps,
					shortFP(ca.Fingerprint(root)), st.Connected, st.Err, len(st.Responses), st.Responses[len(st.Responses)-1].Names)
			}
			svid, err := w.sds.SVID()
			if err != nil {
				return err
			}
			bundle := x509bundle.FromX509Authorities(svid.ID.TrustDomain(), []*x509.Certificate{root})
			_, _, err = x509svid.Verify(svid.Certificates, bundle)
			return err
		})
	}
}

func (m *mesh) checkNoFailures() {
	m.t.Helper()
	m.stopTraffic()
	m.mu.Lock()
	defer m.mu.Unlock()
	n := m.tries.Load()
	if n < 100 {
		m.t.Errorf("only %d connection attempts: the traffic loop did not run", n)
	}
	if len(m.failure) > 0 {
		m.t.Errorf("%d of %d handshakes failed during the rotation; first ones:\n%s", len(m.failure), n,
			strings.Join(m.failure[:min(10, len(m.failure))], "\n"))
	}
	m.t.Logf("%d mTLS connections, %d failed", n, len(m.failure))
}

func rootsOf(st rotation.Status) map[string]string {
	out := map[string]string{}
	for _, r := range st.Roots {
		out[r.Slot] = r.Fingerprint
	}
	return out
}

// TestRootRotationUnderTraffic rotates the root of a running mesh with one
// command while its workloads keep connecting to each other: not one
// handshake fails, and afterwards everything chains to the new root only.
func TestRootRotationUnderTraffic(t *testing.T) {
	rotateUnderTraffic(t, startMesh(t, "web", "cart", "db"))
}

// rotateUnderTraffic runs `meshca root rotate` on m while its workloads
// connect to each other, and checks the outcome.
func rotateUnderTraffic(t *testing.T, m *mesh) {
	before := m.status()
	oldRoot := rootsOf(before)[rotation.SlotCurrent]
	m.startTraffic()

	out := meshcaCmd(t, "root", "rotate", "--admin-socket", m.socket, "--poll", "200ms", "--timeout", "3m")
	t.Logf("meshca root rotate:\n%s", out)
	for _, want := range []string{"prepare done", "activate done", "retire done", "rotation complete"} {
		if !strings.Contains(out, want) {
			t.Errorf("rotate output lacks %q", want)
		}
	}
	after := m.status()
	if after.Phase != ca.PhaseIdle || len(after.Roots) != 1 || after.Roots[0].Fingerprint == oldRoot {
		t.Fatalf("after the rotation: %+v", after)
	}
	bundle, err := os.ReadFile(filepath.Join(m.dataDir, devBundleFile))
	if err != nil {
		t.Fatal(err)
	}
	roots, err := ca.ParseCerts(bundle)
	if err != nil || len(roots) != 1 || ca.Fingerprint(roots[0]) != after.Roots[0].Fingerprint {
		t.Fatalf("root-cert.pem after the rotation: %d roots, %v", len(roots), err)
	}
	m.checkOnlyRoot(roots[0])
	m.checkNoFailures()

	// The ledger, whose checkpoints were signed under both roots, still
	// verifies, and recorded each admin step.
	if out := meshcaCmd(t, "audit", "verify", "--data-dir", m.dataDir); !strings.Contains(out, "\nOK\n") {
		t.Errorf("audit verify after the rotation:\n%s", out)
	}
	list := meshcaCmd(t, "audit", "list", "--data-dir", m.dataDir, "--json")
	for _, step := range []string{"roots/prepare", "roots/activate", "roots/retire"} {
		if !strings.Contains(list, `"target":"`+step+`","result":"ok"`) {
			t.Errorf("no successful admin record for %s", step)
		}
	}
}

// TestRootRotationSurvivesKill9 kills the server with SIGKILL after each
// step and restarts it: each phase resumes from the journal, the agents
// reconnect, and the rotation completes without a failed handshake.
func TestRootRotationSurvivesKill9(t *testing.T) {
	m := startMesh(t, "web", "cart")
	old := rootsOf(m.status())[rotation.SlotCurrent]
	m.startTraffic()

	st := m.step(ca.StepPrepare)
	next := rootsOf(st)[rotation.SlotNext]
	m.kill()
	m.start()
	if st := m.status(); st.Phase != ca.PhasePrepared || rootsOf(st)[rotation.SlotNext] != next {
		t.Fatalf("after a kill in the prepared phase: %+v", st)
	}

	// Refused until the restarted server has every proxy's ACK again.
	st = m.step(ca.StepActivate)
	if rootsOf(st)[rotation.SlotCurrent] != next || rootsOf(st)[rotation.SlotRetiring] != old {
		t.Fatalf("after activate: %+v", st)
	}
	m.kill()
	m.start()
	if st := m.status(); st.Phase != ca.PhaseActivated || rootsOf(st)[rotation.SlotCurrent] != next {
		t.Fatalf("after a kill in the activated phase: %+v", st)
	}

	if st := m.step(ca.StepRetire); st.Phase != ca.PhaseIdle {
		t.Fatalf("after retire: %+v", st)
	}
	m.kill()
	m.start()
	if st := m.status(); st.Phase != ca.PhaseIdle || len(st.Roots) != 1 || st.Roots[0].Fingerprint != next {
		t.Fatalf("after a kill once retired: %+v", st)
	}
	bundle, err := os.ReadFile(filepath.Join(m.dataDir, devBundleFile))
	if err != nil {
		t.Fatal(err)
	}
	roots, err := ca.ParseCerts(bundle)
	if err != nil || len(roots) != 1 {
		t.Fatalf("root-cert.pem: %d roots, %v", len(roots), err)
	}
	m.checkOnlyRoot(roots[0])
	m.checkNoFailures()
}
