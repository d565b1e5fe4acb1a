package agent_test

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/devtoken"
	"github.com/meshca/meshca/internal/agent"
	"github.com/meshca/meshca/internal/certservice"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/keystore/memory"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// Time in these tests. One fake clock drives the CA, the token authority,
// the server and the agents. Peers verify certificates against the real
// time, though (TLS handshakes, and caclient's check of issued chains), so
// the fake clock starts clockLag in the past and certificates live leafTTL:
// whatever is issued while the fake clock is within clockLag of its start
// is valid in real time too.
const (
	clockLag = 20 * time.Hour
	leafTTL  = 24 * time.Hour
	// clusterID is the cluster the token authority vouches for; agents send
	// it, and a wrong one is refused.
	clusterID = "east"
)

// testCtx bounds a test: long enough for the race detector on a busy
// machine, short enough that a hang fails instead of stalling the run.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// newAuthority is catest.NewAuthority with leafTTL as the default and
// longest lifetime, for leaves and the server's own certificate alike.
func newAuthority(t *testing.T, clock clockwork.Clock) *ca.Authority {
	t.Helper()
	src, err := ca.NewSelfManaged(ca.SelfManagedConfig{
		TrustDomain:     catest.TrustDomain,
		Keys:            memory.New(),
		JournalPath:     filepath.Join(t.TempDir(), "ca-journal.json"),
		IntermediateTTL: 30 * 24 * time.Hour,
	})
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.New(ca.Config{TrustDomain: catest.TrustDomain, Source: src, Clock: clock,
		TTL: ca.TTLPolicy{Default: leafTTL, Max: leafTTL, Coverage: 1}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	return a
}

// switchCA is the server's CA, replaceable mid-test: the second CA of a
// root rotation. The server's TLS certificate follows it.
type switchCA struct {
	mu      sync.Mutex
	cur     *ca.Authority
	changed chan struct{}
}

func (s *switchCA) get() *ca.Authority {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

func (s *switchCA) use(a *ca.Authority) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cur = a
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *switchCA) Issue(ctx context.Context, req ca.Request) (*ca.Issued, error) {
	return s.get().Issue(ctx, req)
}

func (s *switchCA) IssueServing(ctx context.Context, pub crypto.PublicKey, id spiffeid.ID, dnsNames []string, ips []net.IP, ttl time.Duration) (*ca.Issued, error) {
	return s.get().IssueServing(ctx, pub, id, dnsNames, ips, ttl)
}

func (s *switchCA) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

// authCall is one credential a recorder saw, at the fake clock's time.
type authCall struct {
	Token, ClusterID string
	At               time.Time
	ID               spiffeid.ID
}

// recorder is an Authenticator that records what it is shown.
type recorder struct {
	identity.Authenticator
	clock clockwork.Clock

	mu    sync.Mutex
	calls []authCall
}

func (r *recorder) Authenticate(ctx context.Context, cred identity.Credential) (identity.Caller, error) {
	c, err := r.Authenticator.Authenticate(ctx, cred)
	r.mu.Lock()
	r.calls = append(r.calls, authCall{Token: cred.Token, ClusterID: cred.ClusterID, At: r.clock.Now(), ID: c.ID})
	r.mu.Unlock()
	return c, err
}

func (r *recorder) seen() []authCall {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]authCall(nil), r.calls...)
}

// network stands between the agents and the server: a TCP proxy whose
// outage cuts every connection and refuses new ones (accepted, then closed
// at once), as a server going down does.
type network struct {
	lis    net.Listener
	target string

	mu    sync.Mutex
	down  bool
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func newNetwork(t *testing.T, target string) *network {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n := &network{lis: lis, target: target, conns: make(map[net.Conn]struct{})}
	n.wg.Add(1)
	go n.accept()
	t.Cleanup(func() {
		lis.Close()
		n.setDown(true)
		n.wg.Wait()
	})
	return n
}

func (n *network) addr() string { return n.lis.Addr().String() }

func (n *network) accept() {
	defer n.wg.Done()
	for {
		c, err := n.lis.Accept()
		if err != nil {
			return
		}
		n.mu.Lock()
		if n.down {
			n.mu.Unlock()
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", n.target)
		if err != nil {
			n.mu.Unlock()
			c.Close()
			continue
		}
		n.conns[c], n.conns[up] = struct{}{}, struct{}{}
		n.wg.Add(2)
		n.mu.Unlock()
		go n.pipe(c, up)
		go n.pipe(up, c)
	}
}

func (n *network) pipe(dst, src net.Conn) {
	defer n.wg.Done()
	_, _ = io.Copy(dst, src)
	dst.Close()
	src.Close()
	n.mu.Lock()
	delete(n.conns, dst)
	delete(n.conns, src)
	n.mu.Unlock()
}

// setDown starts (true) or ends an outage.
func (n *network) setDown(down bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.down = down
	if down {
		for c := range n.conns {
			c.Close()
		}
	}
}

// mesh is a real meshca server (internal/server with the CA API and the
// SDS service in central mode) behind a network the test can cut.
type mesh struct {
	clock  *clockwork.FakeClock
	tokens *devtoken.Authority
	ca     *switchCA
	first  *ca.Authority
	// bundle is what the central SDS service serves as ROOTCA, and as the
	// mTLS policy unless noPolicy is set: then the service says it has
	// none, as a server without a policy store does.
	bundle   *sds.Broadcaster
	noPolicy atomic.Bool
	central  *sds.Server
	// centralReg holds the central service's metrics; nacks the reasons
	// of the NACKs it logged.
	centralReg *prometheus.Registry
	nacks      *nackLog
	// fetches records CreateCertificate calls, streams SDS stream opens.
	fetches, streams *recorder
	net              *network
}

func newMesh(t *testing.T) *mesh {
	t.Helper()
	clock := clockwork.NewFakeClockAt(time.Now().Add(-clockLag).Truncate(time.Second))
	tokens, err := devtoken.New(devtoken.Config{TrustDomain: catest.TrustDomain, ClusterID: clusterID,
		Clock: clock, MaxTTL: 3 * clockLag, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	m := &mesh{
		clock:      clock,
		tokens:     tokens,
		first:      newAuthority(t, clock),
		bundle:     sds.NewBroadcaster(),
		centralReg: prometheus.NewRegistry(),
		nacks:      &nackLog{},
		fetches:    &recorder{Authenticator: tokens, clock: clock},
		streams:    &recorder{Authenticator: tokens, clock: clock},
	}
	m.ca = &switchCA{cur: m.first, changed: make(chan struct{})}
	m.setBundle(t, m.first.Issuer().Roots...)
	svc, err := certservice.New(certservice.Config{Authenticator: m.fetches, Issuer: m.ca})
	if err != nil {
		t.Fatal(err)
	}
	m.central, err = sds.New(sds.Config{Source: meshSource{m}, Authenticate: sds.BearerAuthenticator(m.streams), Clock: clock,
		Metrics: m.centralReg, Logger: slog.New(m.nacks)})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(server.Config{
		GRPCAddr:       "127.0.0.1:0",
		MonitorAddr:    "127.0.0.1:0",
		CA:             m.ca,
		ServerID:       spiffeid.RequireFromString("spiffe://cluster.local/ns/meshca-system/sa/meshca"),
		IPs:            []net.IP{net.IPv4(127, 0, 0, 1)},
		Services:       []server.Service{svc, m.central},
		MaxRecvMsgSize: certservice.MaxRequestBytes,
		Clock:          clock,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	// Registered after the server's, so it runs first: the server's graceful
	// stop then finds no stream open.
	m.net = newNetwork(t, srv.GRPCAddr())
	return m
}

// setBundle changes the bundle the server's SDS service pushes.
func (m *mesh) setBundle(t *testing.T, roots ...*x509.Certificate) {
	t.Helper()
	snap := sds.Snapshot{Roots: roots}
	if cur := m.bundle.Snapshot(); cur != nil {
		snap.Policy = cur.Policy
	}
	if err := m.bundle.Set(snap); err != nil {
		t.Fatal(err)
	}
}

// setPolicy changes the mTLS policy the server's SDS service pushes.
func (m *mesh) setPolicy(t *testing.T, p policy.Policy) {
	t.Helper()
	snap := *m.bundle.Snapshot()
	snap.Policy = &p
	if err := m.bundle.Set(snap); err != nil {
		t.Fatal(err)
	}
}

// meshSource is the central SDS service's source: the mesh's Broadcaster,
// without the policy while noPolicy is set.
type meshSource struct{ m *mesh }

func (s meshSource) Watch(ctx context.Context, p sds.Peer, want sds.Want, changed func()) (sds.Watcher, error) {
	if want.Policy && s.m.noPolicy.Load() {
		return nil, fmt.Errorf("test: %w", sds.ErrNoPolicy)
	}
	return s.m.bundle.Watch(ctx, p, want, changed)
}

// nackLog is the central service's log handler: it keeps the reason of
// every NACK it logs, since a stream's status goes with the stream.
type nackLog struct {
	mu      sync.Mutex
	reasons []string
}

func (l *nackLog) Enabled(context.Context, slog.Level) bool { return true }
func (l *nackLog) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *nackLog) WithGroup(string) slog.Handler            { return l }

func (l *nackLog) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "proxy rejected secrets" {
		return nil
	}
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "error" {
			l.mu.Lock()
			l.reasons = append(l.reasons, a.Value.String())
			l.mu.Unlock()
		}
		return true
	})
	return nil
}

func (l *nackLog) seen() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.reasons...)
}

// mint returns a token for ns/sa, valid throughout the test.
func (m *mesh) mint(t *testing.T, ns, sa string) string {
	t.Helper()
	tok, err := m.tokens.Mint(devtoken.MintRequest{Namespace: ns, ServiceAccount: sa, TTL: 3 * clockLag})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// testAgent is a running agent and where to find it.
type testAgent struct {
	*agent.Agent
	cfg agent.Config
	reg *prometheus.Registry
}

// config is an agent configuration for ns/sa in m, token file and socket in
// a fresh directory.
func (m *mesh) config(t *testing.T, ns, sa string) agent.Config {
	t.Helper()
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	writeToken(t, tokenFile, m.mint(t, ns, sa))
	return agent.Config{
		ServerAddr:  m.net.addr(),
		TrustBundle: m.first.Issuer().Roots,
		ClusterID:   clusterID,
		TokenFile:   tokenFile,
		SocketPath:  filepath.Join(dir, "sds", "agent.sock"),
		Clock:       m.clock,
	}
}

func writeToken(t *testing.T, path, token string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// start runs an agent until the test ends.
func start(t *testing.T, cfg agent.Config) *testAgent {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg.Metrics = reg
	w := &testLog{w: t.Output()}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	a, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent.Run: %v", err)
		}
		w.close()
	})
	return &testAgent{Agent: a, cfg: cfg, reg: reg}
}

// testLog writes to the test's output until closed: gRPC handlers may still
// log a moment after the agent stopped, when the test may be over.
type testLog struct {
	mu     sync.Mutex
	w      io.Writer
	closed bool
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return len(p), nil
	}
	return l.w.Write(p)
}

func (l *testLog) close() {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
}

// startReady starts an agent and waits until it holds a certificate and
// its ROOTCA stream to the server has ACKed the bundle, so that its only
// use of the clock is the renewal timer.
func (m *mesh) startReady(t *testing.T, ctx context.Context, cfg agent.Config) *testAgent {
	t.Helper()
	a := start(t, cfg)
	eventually(t, ctx, "the agent has a certificate", a.Ready)
	m.waitStream(t, ctx, a.Status().ID, time.Time{})
	return a
}

// waitStream waits until the server's SDS service has a stream from id,
// opened at since or later, that has ACKed the current bundle.
func (m *mesh) waitStream(t *testing.T, ctx context.Context, id spiffeid.ID, since time.Time) {
	t.Helper()
	want := ca.Fingerprint(m.bundle.Snapshot().Roots[0])
	eventually(t, ctx, "the agent's ROOTCA stream is open and has ACKed", func() error {
		for _, s := range m.central.Status() {
			if s.Peer.ID == id && !s.Since.Before(since) && len(s.AckedRoots) > 0 && s.AckedRoots[0] == want {
				return nil
			}
		}
		return errors.New("no such stream")
	})
}

// eventually polls f until it returns nil, for what happens on real sockets
// a moment after the call that caused it.
func eventually(t *testing.T, ctx context.Context, what string, f func() error) {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		err := f()
		if err == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting until %s: %v", what, err)
		case <-tick.C:
		}
	}
}

// blockUntil waits until n timers are armed on the fake clock.
func blockUntil(t *testing.T, ctx context.Context, clock *clockwork.FakeClock, n int) {
	t.Helper()
	if err := clock.BlockUntilContext(ctx, n); err != nil {
		t.Fatalf("waiting for %d timers: %v", n, err)
	}
}

// advanceTo moves the fake clock to when.
func advanceTo(t *testing.T, clock *clockwork.FakeClock, when time.Time) {
	t.Helper()
	d := when.Sub(clock.Now())
	if d < 0 {
		t.Fatalf("cannot move the clock back from %s to %s", clock.Now(), when)
	}
	clock.Advance(d)
}

// envoy connects an Envoy-like SDS client to the agent's socket.
func envoy(t *testing.T, ctx context.Context, a *testAgent, node string, delta bool) *sdstest.Client {
	t.Helper()
	return envoyWith(t, ctx, a, sdstest.Config{Node: node, Delta: delta})
}

// envoyWith is envoy with more of the client's configuration.
func envoyWith(t *testing.T, ctx context.Context, a *testAgent, cfg sdstest.Config) *sdstest.Client {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+a.cfg.SocketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	cfg.Conn = conn
	c := sdstest.New(cfg)
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Disconnect)
	return c
}

// wait is Client.Wait that fails the test.
func wait(t *testing.T, ctx context.Context, c *sdstest.Client, cond func(sdstest.State) bool) sdstest.State {
	t.Helper()
	s, err := c.Wait(ctx, cond)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// leafOf returns the leaf of the "default" secret a client holds, or nil.
func leafOf(t *testing.T, s sdstest.State) *x509.Certificate {
	t.Helper()
	sec, ok := s.Secrets[sds.CertName]
	if !ok {
		return nil
	}
	certs, err := ca.ParseCerts(sec.Secret.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
	if err != nil {
		t.Fatal(err)
	}
	return certs[0]
}

// holdsSerial is true once the client holds the certificate with serial.
func holdsSerial(t *testing.T, serial string) func(sdstest.State) bool {
	return func(s sdstest.State) bool {
		l := leafOf(t, s)
		return l != nil && l.SerialNumber.Text(16) == serial
	}
}

// holdsRoot is true once the client holds a ROOTCA with root in it.
func holdsRoot(root *x509.Certificate) func(sdstest.State) bool {
	pemRoot := string(ca.EncodeCerts(root))
	return func(s sdstest.State) bool {
		sec, ok := s.Secrets[sds.RootsName]
		return ok && strings.Contains(string(sec.Secret.GetValidationContext().GetTrustedCa().GetInlineBytes()), pemRoot)
	}
}

// newRoot makes a self-signed root outside any authority, as far as
// proxies can tell the second root of a rotation.
func newRoot(t *testing.T) *x509.Certificate {
	t.Helper()
	now := time.Now()
	return catest.NewRoot(t, ca.Validity{NotBefore: now.Add(-2 * clockLag), NotAfter: now.Add(2 * clockLag)})
}

// metric returns the value of the counter or gauge name with the given
// label pairs, or -1 when there is none.
func metric(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					found = found || lp.GetName() == labels[i] && lp.GetValue() == labels[i+1]
				}
				if !found {
					continue next
				}
			}
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return -1
}

func fetchCount(m *mesh) int { return len(m.fetches.seen()) }
