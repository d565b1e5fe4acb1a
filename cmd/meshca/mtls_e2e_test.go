package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/testenv"
)

// mtlsCLI runs `meshca mtls ...` against one admin socket.
type mtlsCLI struct{ socket string }

func (c mtlsCLI) ok(t *testing.T, args ...string) string {
	t.Helper()
	return meshcaCmd(t, append(append([]string{"mtls"}, args...), "--admin-socket", c.socket)...)
}

func (c mtlsCLI) fails(t *testing.T, args ...string) error {
	t.Helper()
	out, _, err := meshcaRun(append(append([]string{"mtls"}, args...), "--admin-socket", c.socket)...)
	if err == nil {
		t.Fatalf("meshca mtls %s succeeded:\n%s", strings.Join(args, " "), out)
	}
	return err
}

// synced waits until the server's policy store has read the stored policy.
// `meshca dev` prints its banner before it serves: for a moment after it,
// the admin socket may not exist yet, and then status says the policy is
// not read yet.
func (c mtlsCLI) synced(t *testing.T) {
	t.Helper()
	testenv.Eventually(t, "the store has read the policy", func() error {
		out, _, err := meshcaRun("mtls", "status", "--admin-socket", c.socket)
		switch {
		case err != nil:
			return err
		case strings.Contains(out, "not read yet"):
			return errors.New(out)
		}
		return nil
	})
}

// wantLines checks that out says each of lines, with runs of spaces (table
// padding) read as one.
func wantLines(t *testing.T, what, out string, lines ...string) {
	t.Helper()
	for _, l := range lines {
		if !strings.Contains(squash(out), squash(l)) {
			t.Errorf("%s does not say %q:\n%s", what, l, out)
		}
	}
}

var spaces = regexp.MustCompile(` {2,}`)

func squash(s string) string { return spaces.ReplaceAllString(s, " ") }

func readPolicyFile(t *testing.T, path string) policy.Policy {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	p, err := policy.ParseJSON(b)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestMTLSCommandsAgainstDev runs the `meshca mtls` commands against a
// running `meshca dev`, whose policy lives in <data-dir>/mtls-policy.json.
func TestMTLSCommandsAgainstDev(t *testing.T) {
	d := startDev(t, "--sds-socket", "")
	cli := mtlsCLI{socket: filepath.Join(d.dataDir, "admin", "admin.sock")}
	file := filepath.Join(d.dataDir, mtlsPolicyFile)

	cli.synced(t)
	wantLines(t, "status", cli.ok(t, "status"),
		"mTLS off (nothing requires mTLS; enabling it would be STRICT)\n",
		"excluded kubernetes.default.svc.cluster.local\n",
		"store file "+file+", nothing stored yet: the default policy applies\n")

	wantLines(t, "enable", cli.ok(t, "enable"), "mTLS is now on, STRICT (was off).")
	if p := readPolicyFile(t, file); !p.Enabled || p.Mode != policy.ModeStrict {
		t.Fatalf("file after enable: %v", p)
	}
	wantLines(t, "enable again", cli.ok(t, "enable"), "Nothing changed: the policy already said so.")

	out := cli.ok(t, "exclude", "add", "Legacy.Shop.svc.cluster.local.", "*.kube-system.svc.cluster.local")
	wantLines(t, "exclude add", out,
		"Now excluded: *.kube-system.svc.cluster.local, legacy.shop.svc.cluster.local.",
		"excluded *.kube-system.svc.cluster.local\n kubernetes.default.svc.cluster.local\n legacy.shop.svc.cluster.local\n")

	// Refusals change nothing, name the culprits and fail the command.
	before, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	err = cli.fails(t, "exclude", "add", "ok.example", "bad_name.example", "x-.example")
	wantLines(t, "an invalid name", err.Error(), `"bad_name.example"`, `"x-.example"`, "(invalid)")
	err = cli.fails(t, "exclude", "remove", "legacy.shop.svc.cluster.local", "legasy.shop.svc.cluster.local")
	wantLines(t, "removing a name not excluded", err.Error(), "not excluded, so nothing was removed: legasy.shop.svc.cluster.local", "(conflict)")
	err = cli.fails(t, "enable", "--mode", "mutual")
	wantLines(t, "an unknown mode", err.Error(), `mode "mutual"`)
	if after, err := os.ReadFile(file); err != nil || !bytes.Equal(after, before) {
		t.Fatalf("refused commands changed the file:\n%s\nwas\n%s", after, before)
	}

	// An edit of the file by another hand is picked up.
	if err := os.WriteFile(file, []byte(`{"enabled": true, "mode": "PERMISSIVE", "excludedServices": ["legacy.shop.svc.cluster.local"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "status shows the hand edit", func() error {
		if out := cli.ok(t, "status"); !strings.Contains(out, "on, PERMISSIVE") || strings.Contains(out, "kube-system") {
			return fmt.Errorf("status:\n%s", out)
		}
		return nil
	})

	var ch admin.MTLSChange
	if err := json.Unmarshal([]byte(cli.ok(t, "enable", "--mode", "strict", "--json")), &ch); err != nil {
		t.Fatal(err)
	}
	if !ch.Changed || ch.Before.Mode != policy.ModePermissive || ch.After.Mode != policy.ModeStrict {
		t.Errorf("enable --mode strict --json: %+v", ch)
	}

	yaml := cli.ok(t, "render", "--root-namespace", "mesh-root", "--sidecar", "legacy.shop.svc.cluster.local=app=legacy")
	wantLines(t, "render", yaml,
		"kind: PeerAuthentication", "namespace: mesh-root", "mode: STRICT",
		"kind: DestinationRule", "host: legacy.shop.svc.cluster.local", "app: legacy")

	// Without a cluster there are no services to plan against.
	err = cli.fails(t, "plan")
	wantLines(t, "plan in dev", err.Error(), "cannot plan: no Kubernetes API server to list services from")

	wantLines(t, "disable", cli.ok(t, "disable"), "mTLS is now off (was on, STRICT).")
	if p := readPolicyFile(t, file); p.Enabled || !slices.Equal(p.Excluded, []string{"legacy.shop.svc.cluster.local"}) {
		t.Errorf("file after disable: %v", p)
	}

	var st admin.MTLSStatus
	if err := json.Unmarshal([]byte(cli.ok(t, "status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode != policy.ModeDisable || !st.Synced || st.Revision == "" || st.Store != "file "+file {
		t.Errorf("status --json: %+v", st)
	}
	wantLines(t, "/readyz", httpGet(t, "http://"+d.monitorAddr+"/readyz", http.StatusOK), "[+] mtls-policy ok")

	// Every change, refused or not, is in the audit ledger, before and after.
	results := map[string]int{}
	sc := bufio.NewScanner(strings.NewReader(meshcaCmd(t, "audit", "list", "--data-dir", d.dataDir, "--json")))
	for sc.Scan() {
		var r audit.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatal(err)
		}
		if r.Kind == audit.KindAdmin && r.Action == "mtlspolicies.update" {
			results[r.Result]++
		}
	}
	// enable, enable, add, enable --mode strict, disable; add, remove and
	// enable refused.
	if want := map[string]int{"started": 8, "ok": 5, "failed": 3}; !maps.Equal(results, want) {
		t.Errorf("audit records by result %v, want %v", results, want)
	}
}

// hostIP is a non-loopback IPv4 address of this machine, or "".
func hostIP() string {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return ""
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() && !n.IP.IsLinkLocalUnicast() {
			return n.IP.String()
		}
	}
	return ""
}

// TestMTLSPlanAgainstAPIServer plans STRICT over the services of a real
// API server: a service none of whose endpoints has a proxy is named; one
// whose endpoint's address holds the SDS stream of an agent of its
// namespace is not.
func TestMTLSPlanAgainstAPIServer(t *testing.T) {
	// The in-process agent's SDS stream to the server leaves from the
	// address the server listens on: with a non-loopback one, an
	// EndpointSlice (which refuses loopback addresses) can name it.
	ip := hostIP()
	if ip == "" {
		t.Fatal("this machine has no non-loopback IPv4 address for the agent to connect from (EndpointSlices refuse loopback addresses)")
	}
	env := testenv.StartKube(t)
	env.CreateServiceAccount(t, "shop", "web")
	tok := writeFile(t, "token", []byte(env.Token(t, "shop", "web", []string{"meshca"}, time.Hour, nil)))
	args := []string{"--kubeconfig", env.Kubeconfig(),
		"--grpc-addr", net.JoinHostPort(ip, "0"), "--serving-ip", ip, "--sds-token-file", tok}
	env.CreateService(t, "shop", "legacy", []string{"192.0.2.10"}, []string{""})
	env.CreateService(t, "shop", "web", []string{ip}, []string{"web-1"})
	env.CreateService(t, "shop", "idle", nil, nil)

	d := startDev(t, args...)
	cli := mtlsCLI{socket: filepath.Join(d.dataDir, "admin", "admin.sock")}
	cli.synced(t)

	out := cli.ok(t, "plan")
	wantLines(t, "plan", out,
		"plan mTLS on, STRICT, with 1 excluded (today: off)\n",
		"legacy.shop.svc.cluster.local 1 of 1 (all) 192.0.2.10\n",
		wrap("How proxies are found: "+admin.ProxyBasis+".", 80))
	if strings.Contains(out, "idle.shop") {
		t.Errorf("plan names a service without endpoints:\n%s", out)
	}

	// Previewing an exclusion names it no more, and stores nothing.
	if out := cli.ok(t, "plan", "--exclude", "*.shop.svc.cluster.local"); !strings.Contains(out, "Nothing would be cut off") {
		t.Errorf("plan excluding namespace shop:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(d.dataDir, mtlsPolicyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a plan stored the policy: %v", err)
	}

	t.Run("an endpoint whose address holds an agent's SDS stream has a proxy", func(t *testing.T) {
		testenv.Eventually(t, "the plan counts the agent", func() error {
			var plan admin.MTLSPlan
			if err := json.Unmarshal([]byte(cli.ok(t, "plan", "--json")), &plan); err != nil {
				return err
			}
			var names []string
			for _, f := range plan.Findings {
				names = append(names, f.Service)
			}
			if plan.Proxies != 1 || !slices.Equal(names, []string{"legacy.shop.svc.cluster.local"}) {
				return fmt.Errorf("%d proxies, findings %q", plan.Proxies, names)
			}
			return nil
		})
	})
}

// TestMTLSServerKeepsThePolicyInAConfigMap runs `meshca server` against a
// real API server: the ConfigMap is the policy, whether changed by the
// CLI or by a plain client-go Update, and concurrent CLI changes all land.
func TestMTLSServerKeepsThePolicyInAConfigMap(t *testing.T) {
	env := testenv.StartKube(t)
	client := env.Clientset()
	env.CreateNamespace(t, "meshca-system")
	dir := t.TempDir()
	pass := writeFile(t, "pass", []byte("correct horse battery staple"))
	startServer(t, "--data-dir", dir, "--keystore-passphrase-file", pass, "--kubeconfig", env.Kubeconfig())
	cli := mtlsCLI{socket: filepath.Join(dir, "admin", "admin.sock")}
	cms := client.CoreV1().ConfigMaps("meshca-system")
	const name = "meshca-mesh-policy"

	wantLines(t, "enable", cli.ok(t, "enable", "--mode", "permissive"), "mTLS is now on, PERMISSIVE (was off).")
	cm, err := cms.Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cm.Data[policy.KeyEnabled] != "true" || cm.Data[policy.KeyMode] != "PERMISSIVE" {
		t.Fatalf("ConfigMap after enable: %v", cm.Data)
	}

	// kubectl edit, as a plain Update.
	cm.Data[policy.KeyExcluded] = `["billing.shop.svc.cluster.local"]`
	if _, err := cms.Update(t.Context(), cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "status shows the edit", func() error {
		out := cli.ok(t, "status")
		if out = squash(out); !strings.Contains(out, "excluded billing.shop.svc.cluster.local\n") ||
			!strings.Contains(out, "store configmap meshca-system/"+name+", revision ") {
			return fmt.Errorf("status:\n%s", out)
		}
		return nil
	})

	// Concurrent changes through the CLI are merged, none lost.
	names := []string{"a.shop.svc.cluster.local", "b.shop.svc.cluster.local", "c.shop.svc.cluster.local", "d.shop.svc.cluster.local"}
	var wg sync.WaitGroup
	for _, n := range names {
		wg.Go(func() {
			if out, errs, err := meshcaRun("mtls", "exclude", "add", n, "--admin-socket", cli.socket); err != nil {
				t.Errorf("exclude add %s: %v\n%s\nstderr: %s", n, err, out, errs)
			}
		})
	}
	wg.Wait()
	cm, err = cms.Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := policy.ParseConfigMap(cm.Data)
	if err != nil {
		t.Fatal(err)
	}
	if want := append([]string{"billing.shop.svc.cluster.local"}, names...); !slices.Equal(p.Excluded, slices.Sorted(slices.Values(want))) {
		t.Errorf("stored exclusions %q, want %q", p.Excluded, want)
	}

	// A malformed hand edit keeps the last good policy in force, is shown,
	// and blocks changes until fixed.
	cm.Data[policy.KeyMode] = "MUTUAL"
	if _, err := cms.Update(t.Context(), cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "status shows the malformed edit", func() error {
		out := cli.ok(t, "status")
		if !strings.Contains(out, "WARNING") || !strings.Contains(out, `"MUTUAL"`) || !strings.Contains(out, "on, PERMISSIVE") {
			return fmt.Errorf("status:\n%s", out)
		}
		return nil
	})
	err = cli.fails(t, "disable")
	wantLines(t, "disable over a malformed ConfigMap", err.Error(), "malformed", "(conflict)")
}
