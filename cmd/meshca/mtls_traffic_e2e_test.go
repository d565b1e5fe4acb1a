package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshca/meshca/internal/envoysim"
	"github.com/meshca/meshca/internal/envoysim/envoysimtest"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
	"github.com/meshca/meshca/internal/testenv"
)

// livePoll is how often each simulated proxy reads its LDS and CDS files.
// Envoy reacts to the agent's rename at once; the times logged include up
// to one poll.
const livePoll = 50 * time.Millisecond

// Counters of a proxy's inbound listener (see envoysim): which chain took a
// connection, or that none would.
var (
	liveMTLSChain      = "listener." + envoyconfig.InboundListener + "." + envoyconfig.ChainMTLS + ".downstream_cx_total"
	livePlaintextChain = "listener." + envoyconfig.InboundListener + "." + envoyconfig.ChainPlaintext + ".downstream_cx_total"
	liveNoChain        = "listener." + envoyconfig.InboundListener + ".no_filter_chain_match"
)

// liveWorkload is an application behind a simulated Envoy that a
// `meshca agent` configures.
type liveWorkload struct {
	name, fqdn string
	// inbound is where the proxy's inbound listener binds; outbound, when
	// set, where its listener for destination binds.
	inbound, outbound, destination string
	socket, dir                    string
	sim                            *envoysim.Sim
	agentDone, simDone             chan error
}

// liveAddrs returns n distinct free loopback addresses.
func liveAddrs(t *testing.T, n int) []string {
	t.Helper()
	var addrs []string
	for range n {
		// Held open until all are chosen, so none is chosen twice.
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		addrs = append(addrs, l.Addr().String())
	}
	return addrs
}

// startLiveWorkload runs `meshca agent` for default/<name> against dev, with
// its proxy's inbound listener on inbound and its configuration in a
// directory of its own, and, once the agent has written the bootstrap, a
// simulated Envoy on it. destination, when set, is the agent's
// --destination (fqdn=host:port), outbound where its listener binds.
func startLiveWorkload(t *testing.T, d *devServer, name, inbound, destination, outbound string) *liveWorkload {
	t.Helper()
	w := &liveWorkload{name: name, fqdn: name + ".default.svc.cluster.local", inbound: inbound,
		destination: destination, outbound: outbound,
		socket: filepath.Join(t.TempDir(), "sds.sock"), dir: filepath.Join(t.TempDir(), "envoy"),
		agentDone: make(chan error, 1), simDone: make(chan error, 1)}
	app := envoysimtest.App(t, name+": ").String()
	tok := writeFile(t, name+".token", []byte(meshcaCmd(t, "dev", "token", "--data-dir", d.dataDir, "-n", "default", "-s", name)))
	args := []string{"agent", "--addr", d.grpcAddr, "--ca-bundle", filepath.Join(d.dataDir, devBundleFile),
		"--token-file", tok, "--socket", w.socket, "--envoy-config-dir", w.dir, "--service-fqdn", w.fqdn,
		"--inbound-listen", w.inbound, "--inbound-app", app, "--trust-domain", "cluster.local"}
	if destination != "" {
		args = append(args, "--destination", destination+"@"+outbound)
	}
	agentLog, simLog := &syncBuffer{}, &syncBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agent %s's log:\n%s\nproxy %s's log:\n%s", name, agentLog, name, simLog)
		}
	})

	ctx, cancel := context.WithCancel(context.Background())
	cmd := newRootCommand(io.Discard, agentLog)
	cmd.SetArgs(args)
	go func() { w.agentDone <- cmd.ExecuteContext(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-w.agentDone; err != nil {
			t.Errorf("meshca agent for %s: %v", name, err)
		}
	})

	// Envoy starts once the bootstrap exists; the agent writes it only
	// after the first LDS and CDS, rendered from the server's policy.
	boot := filepath.Join(w.dir, envoyconfig.BootstrapFile)
	testenv.Eventually(t, "agent "+name+" writes the bootstrap", func() error {
		if ok, err := liveExited(w.agentDone); ok {
			t.Fatalf("meshca agent for %s exited: %v", name, err)
		}
		_, err := os.Stat(boot)
		return err
	})
	sim, err := envoysim.New(envoysim.Config{Bootstrap: boot, PollInterval: livePoll,
		Logger: slog.New(slog.NewTextHandler(simLog, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	w.sim = sim
	sctx, scancel := context.WithCancel(context.Background())
	go func() { w.simDone <- sim.Run(sctx) }()
	t.Cleanup(func() {
		scancel()
		if err := <-w.simDone; err != nil {
			t.Errorf("proxy %s: %v", name, err)
		}
	})
	wctx, wcancel := context.WithTimeout(context.Background(), time.Minute)
	defer wcancel()
	if _, err := sim.Wait(wctx, func(st envoysim.Status) bool { return w.serving(st) == nil }); err != nil {
		t.Fatalf("proxy %s: %v: %v", name, w.serving(sim.Status()), err)
	}
	return w
}

// serving says why the proxy is not serving its listeners on the addresses
// the agent was given, with every file it was given in force. (Secrets are
// fetched only once a configuration needs TLS.)
func (w *liveWorkload) serving(st envoysim.Status) error {
	var errs []error
	if !st.Running {
		errs = append(errs, errors.New("not running"))
	}
	if st.LDS.Err != nil || st.CDS.Err != nil {
		errs = append(errs, fmt.Errorf("configuration refused: LDS %v, CDS %v", st.LDS.Err, st.CDS.Err))
	}
	if got := st.Listeners[envoyconfig.InboundListener]; got != w.inbound {
		errs = append(errs, fmt.Errorf("inbound listener on %q, want %s", got, w.inbound))
	}
	if w.destination != "" {
		d, err := envoyconfig.ParseDestination(w.destination)
		if err != nil {
			return err
		}
		if got := st.Listeners[envoyconfig.OutboundName(d)]; got != w.outbound {
			errs = append(errs, fmt.Errorf("outbound listener on %q, want %s", got, w.outbound))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("proxy %s: %w", w.name, err)
	}
	return nil
}

// alive fails the test if the agent or its proxy stopped: nothing is
// restarted during the test.
func (w *liveWorkload) alive(t *testing.T) {
	t.Helper()
	if ok, err := liveExited(w.agentDone); ok {
		t.Fatalf("meshca agent for %s exited: %v", w.name, err)
	}
	if ok, err := liveExited(w.simDone); ok {
		t.Fatalf("proxy %s exited: %v", w.name, err)
	}
	if err := w.serving(w.sim.Status()); err != nil {
		t.Fatal(err)
	}
}

// liveExited reports whether done holds a result, leaving it there for the
// cleanup that waits on it.
func liveExited(done chan error) (bool, error) {
	select {
	case err := <-done:
		done <- err
		return true, err
	default:
		return false, nil
	}
}

// liveExchange sends msg over a new plaintext connection to addr,
// half-closes and returns all it gets back: "" when the other end closes
// without an answer.
func liveExchange(addr, msg string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second)) // against a hang only
	if _, err := io.WriteString(c, msg); err != nil {
		return "", nil
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return "", nil
	}
	got, _ := io.ReadAll(c)
	return string(got), nil
}

// liveProbe connects to addr and tells which inbound chain of the proxy
// at took the connection (envoyconfig.ChainMTLS or ChainPlaintext), or ""
// when none would and the connection was refused; whose application
// answered must be the proxy's own.
func liveProbe(addr string, at *liveWorkload) (string, error) {
	before := at.sim.Status().Counters
	const msg = "hello"
	got, err := liveExchange(addr, msg)
	if err != nil {
		return "", err
	}
	// Each counter is taken before the connection is answered or closed.
	after := at.sim.Status().Counters
	delta := func(k string) uint64 { return after[k] - before[k] }
	mtls, plain, none := delta(liveMTLSChain), delta(livePlaintextChain), delta(liveNoChain)
	switch {
	case got == at.name+": "+msg && mtls == 1 && plain == 0 && none == 0:
		return envoyconfig.ChainMTLS, nil
	case got == at.name+": "+msg && plain == 1 && mtls == 0 && none == 0:
		return envoyconfig.ChainPlaintext, nil
	case got == "" && none == 1 && mtls == 0 && plain == 0:
		return "", nil
	}
	return "", fmt.Errorf("%s answered %q; %s's inbound counted %d mTLS, %d plaintext, %d refused",
		addr, got, at.name, mtls, plain, none)
}

// handshakeErrors names the proxies' TLS failures so far, for diagnosis.
func handshakeErrors(ws ...*liveWorkload) error {
	var out []string
	for _, w := range ws {
		for k, v := range w.sim.Status().Counters {
			if strings.HasSuffix(k, ".handshake_error") {
				out = append(out, fmt.Sprintf("%s: %s %d", w.name, k, v))
			}
		}
	}
	if len(out) == 0 {
		return errors.New("no TLS handshake has failed so far")
	}
	slices.Sort(out)
	return errors.New("TLS handshakes failed so far: " + strings.Join(out, ", "))
}

// liveState is what the proxies do under one policy: how a plaintext
// client straight to each inbound listener fares, and on which of db's
// inbound chains web's application arrives through web's outbound
// listener.
type liveState struct {
	name                      string
	webPlaintext, dbPlaintext bool
	proxiedChain              string
}

// TestMTLSPolicyOnLiveTraffic changes the mesh's mTLS policy with the
// `meshca mtls` CLI against `meshca dev`, while two `meshca agent`s
// configure simulated Envoys (real sockets, TLS with the agents' SDS
// secrets) in front of web and db: each change reaches live traffic
// without restarting anything. Off, plaintext goes everywhere; STRICT
// refuses plaintext and web's proxy reaches db's over mTLS; excluding db
// opens db (not web) to plaintext and web's proxy sends db plaintext;
// PERMISSIVE takes both.
func TestMTLSPolicyOnLiveTraffic(t *testing.T) {
	d := startDev(t, "--sds-socket=")
	cli := mtlsCLI{socket: filepath.Join(d.dataDir, "admin", "admin.sock")}
	cli.synced(t)
	wantLines(t, "status", cli.ok(t, "status"), "mTLS off (nothing requires mTLS; enabling it would be STRICT)\n")

	addrs := liveAddrs(t, 3)
	started := liveMark{at: time.Now(), what: "the agents started"}
	db := startLiveWorkload(t, d, "db", addrs[0], "", "")
	const dbFQDN = "db.default.svc.cluster.local"
	web := startLiveWorkload(t, d, "web", addrs[1], dbFQDN+"="+db.inbound, addrs[2])

	// inForce polls until the proxies do what want says, logs how long that
	// took since the mark, then checks that it holds.
	inForce := func(want liveState, since liveMark) {
		t.Helper()
		check := func() error {
			var errs []error
			for _, p := range []struct {
				what, addr string
				at         *liveWorkload
				want       string
			}{
				{"a plaintext client straight to web", web.inbound, web, plaintextChainIf(want.webPlaintext)},
				{"a plaintext client straight to db", db.inbound, db, plaintextChainIf(want.dbPlaintext)},
				{"web's application through web's proxy to db", web.outbound, db, want.proxiedChain},
			} {
				got, err := liveProbe(p.addr, p.at)
				switch {
				case err != nil:
					errs = append(errs, fmt.Errorf("%s: %w", p.what, err))
				case got != p.want:
					errs = append(errs, fmt.Errorf("%s: %s, want %s", p.what, chainMeaning(got), chainMeaning(p.want)))
				}
			}
			if len(errs) > 0 {
				errs = append(errs, handshakeErrors(web, db))
			}
			return errors.Join(errs...)
		}
		testenv.Eventually(t, want.name+" in force", check)
		took := time.Since(since.at)
		t.Logf("%s in force %v after %s (%s; the proxies read their files every %v)",
			want.name, took.Round(time.Millisecond), since.what, since.written(t, web, db), livePoll)
		for range 3 {
			if err := check(); err != nil {
				t.Fatalf("%s was in force, then no longer: %v", want.name, err)
			}
		}
		web.alive(t)
		db.alive(t)
	}
	change := func(wantOut string, args ...string) liveMark {
		t.Helper()
		m := mark(t, web, db)
		wantLines(t, "meshca mtls "+strings.Join(args, " "), cli.ok(t, args...), wantOut)
		return m
	}

	inForce(liveState{name: "mTLS off (the agents' first configuration)", webPlaintext: true, dbPlaintext: true,
		proxiedChain: envoyconfig.ChainPlaintext}, started)

	// Under mTLS each proxy presents its own workload's identity: the
	// certificate its agent's socket serves, as `meshca sds watch` shows it.
	// (The simulator does not report the peer a connection came from; the
	// mTLS chain takes only clients whose certificate chains to the mesh's
	// root with an ID of trust domain cluster.local.)
	for _, w := range []*liveWorkload{web, db} {
		wantLines(t, "sds watch on "+w.name+"'s socket", meshcaCmd(t, "sds", "watch", "--socket", w.socket, "--once"),
			"default spiffe://cluster.local/ns/default/sa/"+w.name+"\n")
	}

	strict := liveState{name: "STRICT", proxiedChain: envoyconfig.ChainMTLS}
	inForce(strict, change("mTLS is now on, STRICT (was off).", "enable"))

	inForce(liveState{name: "STRICT with db excluded", dbPlaintext: true, proxiedChain: envoyconfig.ChainPlaintext},
		change("Now excluded: "+dbFQDN+".", "exclude", "add", dbFQDN))

	strict.name = "STRICT with db no longer excluded"
	inForce(strict, change("No longer excluded: "+dbFQDN+".", "exclude", "remove", dbFQDN))

	inForce(liveState{name: "mTLS off again", webPlaintext: true, dbPlaintext: true, proxiedChain: envoyconfig.ChainPlaintext},
		change("mTLS is now off (was on, STRICT).", "disable"))

	inForce(liveState{name: "PERMISSIVE", webPlaintext: true, dbPlaintext: true, proxiedChain: envoyconfig.ChainMTLS},
		change("mTLS is now on, PERMISSIVE (was off).", "enable", "--mode", "permissive"))
}

// liveMark is a moment, and when each agent's LDS and CDS files had last
// been written then.
type liveMark struct {
	what  string
	at    time.Time
	files map[string]time.Time
}

// liveFiles returns when each agent's LDS and CDS files were last written.
// It only feeds the timing log: a file it cannot stat is logged and left
// out, not a failure.
func liveFiles(t *testing.T, ws ...*liveWorkload) map[string]time.Time {
	t.Helper()
	files := map[string]time.Time{}
	for _, w := range ws {
		for _, f := range []string{envoyconfig.LDSFile, envoyconfig.CDSFile} {
			path := filepath.Join(w.dir, f)
			fi, err := os.Stat(path)
			if err != nil {
				t.Logf("timing log: %v", err)
				continue
			}
			files[path] = fi.ModTime()
		}
	}
	return files
}

func mark(t *testing.T, ws ...*liveWorkload) liveMark {
	t.Helper()
	return liveMark{what: "the command", at: time.Now(), files: liveFiles(t, ws...)}
}

// written says how long after the mark the agents last wrote a file, by
// the files' modification times. The kernel takes those from a clock that
// may lag a tick behind, so a write within a tick may read as zero.
func (m liveMark) written(t *testing.T, ws ...*liveWorkload) string {
	t.Helper()
	var last time.Time
	for path, mod := range liveFiles(t, ws...) {
		if before, ok := m.files[path]; (!ok || !mod.Equal(before)) && mod.After(last) {
			last = mod
		}
	}
	if last.IsZero() {
		return "the agents wrote no file since"
	}
	return "the agents' last write " + max(0, last.Sub(m.at)).Round(time.Millisecond).String() + " after it"
}

func plaintextChainIf(served bool) string {
	if served {
		return envoyconfig.ChainPlaintext
	}
	return ""
}

func chainMeaning(chain string) string {
	switch chain {
	case "":
		return "refused"
	case envoyconfig.ChainMTLS:
		return "served over mTLS"
	default:
		return "served in plaintext"
	}
}
