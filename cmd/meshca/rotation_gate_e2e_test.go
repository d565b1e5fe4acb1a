package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// execResult is how one meshca process ended.
type execResult struct {
	stdout, stderr string
	// pid is the process's, which the admin API records as the actor.
	pid int
	// err is an *exec.ExitError for a non-zero exit.
	err error
}

func (r execResult) exitCode() int {
	var ee *exec.ExitError
	if errors.As(r.err, &ee) {
		return ee.ExitCode()
	}
	if r.err != nil {
		return -1
	}
	return 0
}

// meshcaExec runs meshca in a process of its own (see meshcaChild), as a
// user runs it from a shell, and returns what it printed and how it
// exited. Unlike meshcaCmd it does not fail the test: refusals are what
// some callers want to see.
func meshcaExec(t *testing.T, args ...string) execResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := meshcaChild(ctx, args...)
	var out, errs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errs
	err := cmd.Run()
	r := execResult{stdout: out.String(), stderr: errs.String(), err: err}
	if cmd.ProcessState != nil {
		r.pid = cmd.ProcessState.Pid()
	}
	return r
}

// gateRig is `meshca dev` with three proxies on its central SDS service,
// one per way a proxy can answer a new trust bundle.
type gateRig struct {
	t      *testing.T
	d      *devServer
	socket string
	// acking ACKs everything; rejecting NACKs any bundle of more than one
	// root; holding never answers such a bundle.
	acking, rejecting, holding *sdstest.Client
}

// Identities of the proxies activate waits on.
var (
	gateRejecting = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/rejecting")
	gateHolding   = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/holding")
)

// gateRejection is the rejecting proxy's NACK.
const gateRejection = "this proxy trusts a bundle of exactly one root"

func startGateRig(t *testing.T) *gateRig {
	t.Helper()
	// No node agent: its upstream stream would be a fourth proxy.
	d, _, _ := runDev(t, "--sds-socket=")
	g := &gateRig{t: t, d: d, socket: filepath.Join(d.dataDir, "admin", "admin.sock")}
	g.acking = centralProxy(t, d, "shop", "acking", sdstest.Config{})
	g.rejecting = centralProxy(t, d, "shop", "rejecting", sdstest.Config{Reject: func(sec *tlsv3.Secret) error {
		if n := bundleSize(sec); n > 1 {
			return fmt.Errorf("%s, got %d", gateRejection, n)
		}
		return nil
	}})
	g.holding = centralProxy(t, d, "shop", "holding", sdstest.Config{Hold: func(ctx context.Context, r sdstest.Response) {
		for _, sec := range r.Secrets {
			if bundleSize(sec) > 1 {
				<-ctx.Done() // until the stream ends: the answer never goes out
				return
			}
		}
	}})
	return g
}

// bundleSize counts the roots of a ROOTCA secret; 0 for other secrets.
func bundleSize(sec *tlsv3.Secret) int {
	if sec.GetName() != sds.RootsName {
		return 0
	}
	roots, err := ca.ParseCerts(sec.GetValidationContext().GetTrustedCa().GetInlineBytes())
	if err != nil {
		return 0 // the client has already NACKed a bundle that does not parse
	}
	return len(roots)
}

// root runs `meshca root args...` against the rig's admin socket and logs
// what it printed.
func (g *gateRig) root(args ...string) execResult {
	g.t.Helper()
	r := meshcaExec(g.t, append(append([]string{"root"}, args...), "--admin-socket", g.socket)...)
	g.t.Logf("$ meshca root %s\nexit %d\n--- stdout\n%s--- stderr\n%s", strings.Join(args, " "), r.exitCode(), r.stdout, r.stderr)
	return r
}

// ok runs a root command that must succeed.
func (g *gateRig) ok(args ...string) execResult {
	g.t.Helper()
	r := g.root(args...)
	if r.err != nil {
		g.t.Fatalf("meshca root %s: %v", strings.Join(args, " "), r.err)
	}
	return r
}

// refused runs a root command that must fail as a refusal does: exit
// status 1, nothing on stdout, the reason on stderr.
func (g *gateRig) refused(args ...string) execResult {
	g.t.Helper()
	r := g.root(args...)
	if code := r.exitCode(); code != 1 {
		g.t.Fatalf("meshca root %s exited %d (%v), want 1", strings.Join(args, " "), code, r.err)
	}
	if r.stdout != "" {
		g.t.Errorf("a refused step printed on stdout:\n%s", r.stdout)
	}
	return r
}

// status is what `meshca root status --json` says, run in this process:
// waitFor polls it.
func (g *gateRig) status() rotation.Status {
	g.t.Helper()
	out := meshcaCmd(g.t, "root", "status", "--json", "--admin-socket", g.socket)
	var st rotation.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		g.t.Fatalf("meshca root status --json: %v\n%s", err, out)
	}
	return st
}

// waitFor polls `meshca root status` until the proxies activate waits on
// are exactly want (identity: state), with connected proxies connected and
// acked of them having ACKed the prepared root.
func (g *gateRig) waitFor(connected, acked int, want map[spiffeid.ID]string) rotation.Status {
	g.t.Helper()
	var st rotation.Status
	testenv.Eventually(g.t, "the proxies' answers in `meshca root status`", func() error {
		st = g.status()
		if st.Phase != ca.PhasePrepared {
			return fmt.Errorf("phase %s", st.Phase)
		}
		got := map[spiffeid.ID]string{}
		for _, m := range st.Missing {
			got[spiffeid.RequireFromString(m.Identity)] = m.State
		}
		next := rootIn(st, rotation.SlotNext)
		if st.Proxies != connected || next.AckedProxies != acked || !maps.Equal(got, want) {
			return fmt.Errorf("%d connected, %d ACKed the new root, missing %v; want %d, %d, %v", st.Proxies, next.AckedProxies, got, connected, acked, want)
		}
		return nil
	})
	return st
}

// rootIn returns the root in slot; the zero Root when there is none.
func rootIn(st rotation.Status, slot string) rotation.Root {
	for _, r := range st.Roots {
		if r.Slot == slot {
			return r
		}
	}
	return rotation.Root{}
}

// lastLine is the line a shell user sees last: main's "meshca: <error>".
func lastLine(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return lines[len(lines)-1]
}

// activateRecords are the admin records of `activate` in the ledger, from
// `meshca audit list --json`, oldest first.
func activateRecords(t *testing.T, dataDir string) []audit.Record {
	t.Helper()
	var out []audit.Record
	sc := bufio.NewScanner(strings.NewReader(meshcaCmd(t, "audit", "list", "--data-dir", dataDir, "--json")))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var rec audit.Record
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("audit list --json line %q: %v", sc.Text(), err)
		}
		if rec.Kind == audit.KindAdmin && rec.Target == "roots/"+string(ca.StepActivate) {
			out = append(out, rec)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// checkActivateAudit checks that the ledger holds, for each activate run
// (by process), a "started" record and then its outcome, in that order.
func checkActivateAudit(t *testing.T, dataDir string, runs []execResult) {
	t.Helper()
	recs := activateRecords(t, dataDir)
	var lines []string
	for _, r := range recs {
		lines = append(lines, fmt.Sprintf("%s %s %s %s: %s", r.Time.Format(time.RFC3339), r.Actor, r.Target, r.Result, r.Detail))
	}
	t.Logf("admin records of activate (meshca audit list --json):\n%s", strings.Join(lines, "\n"))
	if len(recs) != 2*len(runs) {
		t.Fatalf("%d admin records of activate, want 2 for each of %d runs", len(recs), len(runs))
	}
	for i, run := range runs {
		started, outcome := recs[2*i], recs[2*i+1]
		actor := fmt.Sprintf(",pid=%d", run.pid)
		for _, rec := range []audit.Record{started, outcome} {
			if !strings.HasPrefix(rec.Actor, "unix:uid=") || !strings.HasSuffix(rec.Actor, actor) {
				t.Errorf("run %d: actor %q, want the uid and pid of the command's process (%s)", i+1, rec.Actor, actor)
			}
		}
		if started.Result != "started" {
			t.Errorf("run %d: first record is %q, want started", i+1, started.Result)
		}
		switch {
		case run.err == nil && outcome.Result != "ok":
			t.Errorf("run %d succeeded, but its record says %q: %s", i+1, outcome.Result, outcome.Detail)
		case run.err != nil && (outcome.Result != "failed" || !strings.Contains(outcome.Detail, "activate refused: ")):
			t.Errorf("run %d was refused, but its record says %q: %s", i+1, outcome.Result, outcome.Detail)
		case run.err != nil && !strings.Contains(run.stderr, outcome.Detail):
			t.Errorf("run %d: the record's reason %q is not the one the command printed", i+1, outcome.Detail)
		case run.err == nil && strings.Contains(run.stderr, "WARNING:") &&
			(!strings.Contains(outcome.Detail, "WARNING: activate forced") || !strings.Contains(started.Detail, `"force":true`)):
			t.Errorf("run %d was forced, but its records do not say so: %q, %q", i+1, started.Detail, outcome.Detail)
		}
	}
}

// TestActivateWaitsForEveryProxy drives the activate gate through the CLI
// with three proxies on the server's SDS: one ACKs the new trust bundle,
// one rejects it and one never answers. Activate is refused, naming the
// count and each proxy's state; a proxy that goes away still counts,
// because it holds a live certificate; --force activates anyway with a
// warning; --min-acked lowers the bar by the documented rule; and every
// attempt is in the audit ledger.
func TestActivateWaitsForEveryProxy(t *testing.T) {
	t.Run("refused until forced", func(t *testing.T) {
		g := startGateRig(t)
		before := g.status()
		if before.Phase != ca.PhaseIdle || before.Proxies != 3 || len(before.Roots) != 1 {
			t.Fatalf("before prepare: phase %s, %d proxies, %d roots; want idle, 3, 1", before.Phase, before.Proxies, len(before.Roots))
		}
		oldRoot := before.Roots[0].Fingerprint

		prepared := g.ok("prepare")
		st := g.status()
		newRoot := rootIn(st, rotation.SlotNext).Fingerprint
		if st.Phase != ca.PhasePrepared || newRoot == "" || newRoot == oldRoot || rootIn(st, rotation.SlotCurrent).Fingerprint != oldRoot {
			t.Fatalf("after prepare: %+v", st)
		}
		wantLines(t, "prepare", prepared.stdout, "phase prepared since", "next "+shortFP(newRoot), "current "+shortFP(oldRoot))

		// The new bundle reaches each proxy; each answers in its way.
		st = g.waitFor(3, 1, map[spiffeid.ID]string{gateRejecting: rotation.StateRejected, gateHolding: rotation.StatePending})
		for _, m := range st.Missing {
			if m.State == rotation.StateRejected && !strings.Contains(m.Error, gateRejection) {
				t.Errorf("the rejected proxy's error is %q, want its NACK %q", m.Error, gateRejection)
			}
		}
		g.ok("status")

		var runs []execResult
		r := g.refused("activate")
		runs = append(runs, r)
		wantLines(t, "refused activate", lastLine(r.stderr),
			"meshca: ", "activate refused: 1 of 3 proxies have ACKed a trust bundle with the new root (100% required); 2 missing: 1 connected but not ACKed yet, 1 rejected it (NACK)")
		wantLines(t, "refused activate", r.stderr,
			"phase prepared since",
			"next step activate: blocked",
			"missing "+gateHolding.String()+" (node holding): pending",
			"missing "+gateRejecting.String()+" (node rejecting): rejected: "+gateRejection)
		if st := g.status(); st.Phase != ca.PhasePrepared || rootIn(st, rotation.SlotCurrent).Fingerprint != oldRoot {
			t.Fatalf("a refused activate changed the rotation: %+v", st)
		}

		// A proxy that goes away is not forgotten: its certificate is live
		// and chains to the old root only, so it still counts as missing.
		g.holding.Disconnect()
		g.waitFor(2, 1, map[spiffeid.ID]string{gateRejecting: rotation.StateRejected, gateHolding: rotation.StateDisconnected})
		g.ok("status")
		r = g.refused("activate")
		runs = append(runs, r)
		wantLines(t, "activate after a disconnect", lastLine(r.stderr),
			"activate refused: 1 of 3 proxies have ACKed a trust bundle with the new root (100% required); 2 missing: 1 rejected it (NACK), 1 hold a live certificate but have no SDS stream")
		wantLines(t, "activate after a disconnect", r.stderr, "missing "+gateHolding.String()+": disconnected")

		forced := g.ok("activate", "--force")
		runs = append(runs, forced)
		wantLines(t, "forced activate", forced.stderr,
			"WARNING: activate forced although: 1 of 3 proxies have ACKed a trust bundle with the new root (100% required); 2 missing: 1 rejected it (NACK), 1 hold a live certificate but have no SDS stream")
		wantLines(t, "forced activate", forced.stdout, "phase activated since", "current "+shortFP(newRoot), "retiring "+shortFP(oldRoot))
		st = g.status()
		if st.Phase != ca.PhaseActivated || rootIn(st, rotation.SlotCurrent).Fingerprint != newRoot || rootIn(st, rotation.SlotRetiring).Fingerprint != oldRoot {
			t.Fatalf("after the forced activate: %+v", st)
		}

		// A certificate issued now, by the documented client flow, chains
		// to the new root and not to the old one.
		dir := g.d.issueTo(t, "shop", "fresh")
		svid, bundle := loadSVID(t, dir)
		var newCert, oldCert *x509.Certificate
		for _, c := range bundle.X509Authorities() {
			switch ca.Fingerprint(c) {
			case newRoot:
				newCert = c
			case oldRoot:
				oldCert = c
			}
		}
		if newCert == nil || oldCert == nil {
			t.Fatalf("the trust bundle written with the certificate lacks the new or the old root")
		}
		td := svid.ID.TrustDomain()
		if _, _, err := x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(td, []*x509.Certificate{newCert})); err != nil {
			t.Errorf("a certificate issued after activate does not chain to the new root: %v", err)
		}
		if _, _, err := x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(td, []*x509.Certificate{oldCert})); err == nil {
			t.Error("a certificate issued after activate still chains to the old root")
		}

		checkActivateAudit(t, g.d.dataDir, runs)
	})

	t.Run("min-acked", func(t *testing.T) {
		g := startGateRig(t)
		g.ok("prepare")
		g.waitFor(3, 1, map[spiffeid.ID]string{gateRejecting: rotation.StateRejected, gateHolding: rotation.StatePending})

		// The rule: activate needs ceil(minAcked × proxies) ACKs, so with
		// 1 of 3 a bar just over a third is refused and 0.3 lets it pass,
		// with no warning: the gate holds for the lowered bar.
		var runs []execResult
		r := g.refused("activate", "--min-acked", "0.34")
		runs = append(runs, r)
		wantLines(t, "activate --min-acked 0.34", lastLine(r.stderr),
			"activate refused: 1 of 3 proxies have ACKed a trust bundle with the new root (34% required); 2 missing: 1 connected but not ACKed yet, 1 rejected it (NACK)")
		r = g.ok("activate", "--min-acked", "0.3")
		runs = append(runs, r)
		if r.stderr != "" {
			t.Errorf("activate within its lowered bar printed on stderr:\n%s", r.stderr)
		}
		wantLines(t, "activate --min-acked 0.3", r.stdout, "phase activated since")
		if st := g.status(); st.Phase != ca.PhaseActivated || slices.ContainsFunc(st.Roots, func(r rotation.Root) bool { return r.Slot == rotation.SlotNext }) {
			t.Fatalf("after activate --min-acked 0.3: %+v", st)
		}
		checkActivateAudit(t, g.d.dataDir, runs)
	})
}
