package main

import (
	"bufio"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/caclient"
)

// meshcaProcess runs `meshca dev` in a child process (see meshcaChild) and
// returns it with its CA API address. Later flags in extra override the
// defaults.
func meshcaProcess(t *testing.T, dataDir string, extra ...string) (*exec.Cmd, string) {
	t.Helper()
	args := append([]string{"dev", "--data-dir", dataDir,
		"--grpc-addr", "127.0.0.1:0", "--monitor-addr", "127.0.0.1:0", "--log-level", "warn"}, extra...)
	cmd := meshcaChild(context.Background(), args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("meshca dev's log:\n%s", logs.String())
		}
	})
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	re := regexp.MustCompile(`CA API\s+(\S+)`)
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			go io.Copy(io.Discard, out)
			return cmd, m[1]
		}
	}
	t.Fatalf("meshca dev printed no CA API address: %v", sc.Err())
	return nil, ""
}

// TestAuditSurvivesKill9: a meshca process killed with SIGKILL while it
// issues under load has recorded every certificate a client received, and
// its ledger verifies after a restart.
func TestAuditSurvivesKill9(t *testing.T) {
	dir := t.TempDir()
	var received []string
	for round := range 3 {
		proc, addr := meshcaProcess(t, dir)
		tok := strings.TrimSpace(meshcaCmd(t, "dev", "token", "--data-dir", dir, "-n", "shop", "-s", "cart"))
		bundle, err := caclient.LoadBundle(filepath.Join(dir, devBundleFile))
		if err != nil {
			t.Fatal(err)
		}
		client, err := caclient.New(caclient.Config{Address: addr, TrustBundle: bundle, Timeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		var (
			mu     sync.Mutex
			serial []string
			wg     sync.WaitGroup
		)
		ctx, cancel := context.WithCancel(context.Background())
		for range 8 {
			wg.Go(func() {
				for ctx.Err() == nil {
					creds, err := client.Fetch(ctx, caclient.Request{Token: tok})
					if err != nil {
						continue // the process is being killed
					}
					mu.Lock()
					serial = append(serial, creds.Chain[0].SerialNumber.Text(16))
					mu.Unlock()
				}
			})
		}
		// Kill it mid-load, once it has issued a few hundred.
		for {
			mu.Lock()
			n := len(serial)
			mu.Unlock()
			if n >= 200*(round+1) {
				break
			}
			time.Sleep(time.Millisecond)
		}
		if err := proc.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		proc.Wait()
		cancel()
		wg.Wait()
		client.Close()
		received = append(received, serial...)

		l, err := audit.OpenReadOnly(filepath.Join(dir, devAuditDir))
		if err != nil {
			t.Fatal(err)
		}
		recorded := map[string]bool{}
		for r, err := range l.Query(context.Background(), audit.Filter{Kinds: []audit.Kind{audit.KindIssued}}) {
			if err != nil {
				t.Fatal(err)
			}
			recorded[r.Serial] = true
		}
		l.Close()
		for _, s := range received {
			if !recorded[s] {
				t.Fatalf("round %d: certificate %s reached a client but is not in the ledger", round, s)
			}
		}
		t.Logf("round %d: killed after %d certificates; %d received so far, all recorded (%d records)", round, len(serial), len(received), len(recorded))
	}
	// A restart repairs a torn tail; then the chain verifies end to end.
	proc, _ := meshcaProcess(t, dir)
	proc.Process.Signal(syscall.SIGTERM)
	if err := proc.Wait(); err != nil {
		t.Fatalf("meshca dev after the kills: %v", err)
	}
	out := meshcaCmd(t, "audit", "verify", "--data-dir", dir)
	if !strings.Contains(out, "\nOK\n") {
		t.Fatalf("audit verify after the kills:\n%s", out)
	}
	t.Log(out)
}

// TestAuditCommands runs the audit CLI against a running `meshca dev`.
func TestAuditCommands(t *testing.T) {
	// No node agent: its certificate would be a record more.
	d := startDev(t, "--sds-socket=")
	web := d.issueTo(t, "default", "web")
	d.issueTo(t, "shop", "db")
	bad := filepath.Join(t.TempDir(), "bad.token")
	os.WriteFile(bad, []byte("not-a-token"), 0o600)
	cmd := newRootCommand(io.Discard, io.Discard)
	cmd.SetArgs([]string{"cert", "--addr", d.grpcAddr, "--ca-bundle", filepath.Join(d.dataDir, devBundleFile), "--token-file", bad, "--out", t.TempDir()})
	if err := cmd.ExecuteContext(context.Background()); err == nil {
		t.Fatal("a bad token got a certificate")
	}
	svid, _ := loadSVID(t, web)
	serial := svid.Certificates[0].SerialNumber.Text(16)

	list := meshcaCmd(t, "audit", "list", "--data-dir", d.dataDir)
	if n := strings.Count(list, "\n"); n != 4 || strings.Count(list, " issued ") != 2 || strings.Count(list, " denied ") != 1 || !strings.Contains(list, serial) {
		t.Fatalf("audit list:\n%s", list)
	}
	if out := meshcaCmd(t, "audit", "list", "--data-dir", d.dataDir, "--denied"); strings.Count(out, "invalid-token") != 1 || strings.Contains(out, " issued ") {
		t.Fatalf("audit list --denied:\n%s", out)
	}
	if out := meshcaCmd(t, "audit", "list", "--data-dir", d.dataDir, "--namespace", "shop", "--valid-now", "--json"); strings.Count(out, "\n") != 1 || !strings.Contains(out, `"spiffe_id":"spiffe://cluster.local/ns/shop/sa/db"`) {
		t.Fatalf("audit list --namespace shop --valid-now --json:\n%s", out)
	}
	show := meshcaCmd(t, "audit", "show", "--data-dir", d.dataDir, serial)
	for _, want := range []string{`"serial": "` + serial + `"`, `"spiffe_id": "spiffe://cluster.local/ns/default/sa/web"`, `"key_type": "ecdsa-p256"`, `"root_fingerprint"`, `"token_hash"`} {
		if !strings.Contains(show, want) {
			t.Errorf("audit show lacks %s:\n%s", want, show)
		}
	}
	if export := meshcaCmd(t, "audit", "export", "--data-dir", d.dataDir); strings.Count(export, "\n") != 3 {
		t.Errorf("audit export wrote %d lines, want 3:\n%s", strings.Count(export, "\n"), export)
	}
	stats := meshcaCmd(t, "audit", "stats", "--data-dir", d.dataDir)
	if !strings.Contains(stats, "spiffe://cluster.local/ns/default/sa/web  1") || !strings.Contains(stats, "invalid-token  1") {
		t.Errorf("audit stats:\n%s", stats)
	}
	if out := meshcaCmd(t, "audit", "verify", "--data-dir", d.dataDir); !strings.Contains(out, "records      3 (seq 1..3)") || !strings.Contains(out, "\nOK\n") {
		t.Fatalf("audit verify:\n%s", out)
	}

	// An edited record is found, exactly.
	segs, _ := filepath.Glob(filepath.Join(d.dataDir, devAuditDir, "seg-*.log"))
	if len(segs) != 1 {
		t.Fatalf("segments %v", segs)
	}
	raw, _ := os.ReadFile(segs[0])
	edited := strings.Replace(string(raw), `"namespace":"shop"`, `"namespace":"prod"`, 1)
	if edited == string(raw) {
		t.Fatal("nothing to edit")
	}
	os.WriteFile(segs[0], []byte(edited), 0o600)
	var out strings.Builder
	cmd = newRootCommand(&out, io.Discard)
	cmd.SetArgs([]string{"audit", "verify", "--data-dir", d.dataDir})
	err := cmd.ExecuteContext(context.Background())
	if err == nil || !strings.Contains(out.String(), "BROKEN at "+filepath.Base(segs[0])+" line 2, seq 2") {
		t.Fatalf("verify of an edited ledger: %v\n%s", err, out.String())
	}
}
