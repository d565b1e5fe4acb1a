package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/internal/testenv"
)

// syncBuffer lets a test read what a running command has printed so far.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// meshcaCmd runs one meshca command line to completion, failing the test
// if it fails.
func meshcaCmd(t *testing.T, args ...string) string {
	t.Helper()
	out, errs, err := meshcaRun(args...)
	if err != nil {
		t.Fatalf("meshca %s: %v\nstderr: %s", strings.Join(args, " "), err, errs)
	}
	return out
}

// meshcaRun runs one meshca command line in-process and returns what it
// printed and its error. It does not touch the test, so it may run on any
// goroutine.
func meshcaRun(args ...string) (stdout, stderr string, err error) {
	var out, errs bytes.Buffer
	cmd := newRootCommand(&out, &errs)
	cmd.SetArgs(args)
	err = cmd.ExecuteContext(context.Background())
	return out.String(), errs.String(), err
}

type devServer struct {
	dataDir, grpcAddr, monitorAddr string
}

// runDev runs `meshca dev` in-process on free loopback ports, waits for its
// banner and learns its addresses from it. It returns what dev printed and
// a stop function that returns dev's result; the test's cleanup stops it
// too.
func runDev(t *testing.T, args ...string) (*devServer, *syncBuffer, func() error) {
	t.Helper()
	d := &devServer{dataDir: t.TempDir()}
	out := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := newRootCommand(out, io.Discard)
	cmd.SetArgs(append([]string{"dev", "--data-dir", d.dataDir, "--grpc-addr", "127.0.0.1:0", "--monitor-addr", "127.0.0.1:0"}, args...))
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	var result error
	stopped := false
	stop := func() error {
		if !stopped {
			cancel()
			result, stopped = <-done, true
		}
		return result
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("meshca dev: %v", err)
		}
	})
	api := regexp.MustCompile(`CA API\s+(\S+)`)
	mon := regexp.MustCompile(`monitoring\s+http://(\S+)/metrics`)
	testenv.Eventually(t, "meshca dev prints its banner", func() error {
		select {
		case err := <-done:
			t.Fatalf("meshca dev exited: %v\n%s", err, out.String())
		default:
		}
		if m := api.FindStringSubmatch(out.String()); m != nil && strings.Contains(out.String(), "Stop with Ctrl-C") {
			d.grpcAddr = m[1]
			d.monitorAddr = mon.FindStringSubmatch(out.String())[1]
			return nil
		}
		return errors.New("no banner yet")
	})
	return d, out, stop
}

// startDev runs `meshca dev` in-process on free loopback ports until the
// test ends, learns its addresses from the banner it prints, and checks
// that the banner tells how to use it.
func startDev(t *testing.T, args ...string) *devServer {
	t.Helper()
	d, out, _ := runDev(t, args...)
	// The banner's own instructions must be what the test runs.
	mint := "dev token --data-dir " + d.dataDir
	if slices.Contains(args, "--kubeconfig") {
		mint = "create token web --audience meshca"
	}
	for _, want := range []string{mint, "cert --addr " + d.grpcAddr, "DEVELOPMENT MODE"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("banner does not say %q:\n%s", want, out.String())
		}
	}
	return d
}

// issueTo runs the documented client flow for ns/sa and returns the output
// directory.
func (d *devServer) issueTo(t *testing.T, ns, sa string) string {
	t.Helper()
	tokenFile := filepath.Join(t.TempDir(), sa+".token")
	tok := meshcaCmd(t, "dev", "token", "--data-dir", d.dataDir, "--namespace", ns, "--service-account", sa)
	if err := os.WriteFile(tokenFile, []byte(tok), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), sa)
	printed := meshcaCmd(t, "cert", "--addr", d.grpcAddr, "--ca-bundle", filepath.Join(d.dataDir, "root-cert.pem"),
		"--token-file", tokenFile, "--out", out)
	if want := "spiffe://cluster.local/ns/" + ns + "/sa/" + sa; !strings.Contains(printed, want) {
		t.Fatalf("cert printed %q, want it to name %s", printed, want)
	}
	return out
}

func loadSVID(t *testing.T, dir string) (*x509svid.SVID, *x509bundle.Bundle) {
	t.Helper()
	svid, err := x509svid.Load(filepath.Join(dir, "cert-chain.pem"), filepath.Join(dir, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	bundle, err := x509bundle.Load(svid.ID.TrustDomain(), filepath.Join(dir, "root-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	return svid, bundle
}

// handshake runs a real mTLS handshake over loopback TCP between a server
// and a client workload, each authorising the other's SPIFFE ID. It returns
// the server's and the client's errors. extraClientRoots are trusted by the
// client in addition to its own bundle.
func handshake(t *testing.T, serverDir, clientDir string, extraClientRoots ...string) (serverErr, clientErr error) {
	t.Helper()
	ssvid, sbundle := loadSVID(t, serverDir)
	csvid, cbundle := loadSVID(t, clientDir)
	for _, dir := range extraClientRoots {
		_, b := loadSVID(t, dir)
		for _, r := range b.X509Authorities() {
			cbundle.AddX509Authority(r)
		}
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(ssvid, sbundle, tlsconfig.AuthorizeID(csvid.ID)))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	srvDone := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			srvDone <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if err := c.(*tls.Conn).Handshake(); err != nil {
			srvDone <- err
			return
		}
		_, err = io.WriteString(c, "hello "+peerID(c.(*tls.Conn)))
		srvDone <- err
	}()
	conn, err := tls.Dial("tcp", l.Addr().String(), tlsconfig.MTLSClientConfig(csvid, cbundle, tlsconfig.AuthorizeID(ssvid.ID)))
	if err == nil {
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		var msg []byte
		msg, err = io.ReadAll(conn)
		if err == nil && string(msg) != "hello "+csvid.ID.String() {
			err = errors.New("unexpected greeting " + string(msg))
		}
	}
	return <-srvDone, err
}

func peerID(c *tls.Conn) string {
	id, err := x509svid.IDFromCert(c.ConnectionState().PeerCertificates[0])
	if err != nil {
		return "?"
	}
	return id.String()
}

func TestDevEndToEnd(t *testing.T) {
	// No node agent: it would be a third workload in the metrics.
	d := startDev(t, "--sds-socket=")
	web := d.issueTo(t, "default", "web")
	db := d.issueTo(t, "prod", "db")

	svid, _ := loadSVID(t, web)
	if svid.ID != spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/web") {
		t.Fatalf("web got %s", svid.ID)
	}
	if fi, err := os.Stat(filepath.Join(web, "key.pem")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key.pem mode %v (err %v), want 0600", fi.Mode().Perm(), err)
	}

	if serr, cerr := handshake(t, web, db); serr != nil || cerr != nil {
		t.Fatalf("mTLS between two meshca workloads failed: server %v, client %v", serr, cerr)
	}

	// A workload of another meshca (another root) is refused both ways:
	// as a client (even one that trusts our root, so it gets as far as
	// presenting its certificate) and as a server.
	other := startDev(t)
	stranger := other.issueTo(t, "default", "stranger")
	serr, _ := handshake(t, web, stranger, web)
	if serr == nil || !strings.Contains(serr.Error(), "x509svid: could not verify leaf certificate") {
		t.Errorf("server accepted a client certificate from another CA: %v", serr)
	}
	_, cerr := handshake(t, stranger, web)
	if cerr == nil || !strings.Contains(cerr.Error(), "x509svid: could not verify leaf certificate") {
		t.Errorf("client accepted a server certificate from another CA: %v", cerr)
	}

	// Operability endpoints reflect what happened.
	body := httpGet(t, "http://"+d.monitorAddr+"/readyz", http.StatusOK)
	if !strings.Contains(body, "[+] ca ok") {
		t.Errorf("/readyz = %q", body)
	}
	metrics := httpGet(t, "http://"+d.monitorAddr+"/metrics", http.StatusOK)
	if !strings.Contains(metrics, `meshca_ca_certificates_issued_total{kind="workload"} 2`) {
		t.Errorf("metrics do not count 2 workload certificates:\n%s", grepLines(metrics, "meshca_ca_certificates_issued_total"))
	}
}

func TestDevRestartKeepsRoot(t *testing.T) {
	dir := t.TempDir()
	re := regexp.MustCompile(`root ([0-9a-f]{16})…`)
	run := func() string {
		// The later --data-dir wins over runDev's own.
		_, out, stop := runDev(t, "--data-dir", dir)
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		m := re.FindStringSubmatch(out.String())
		if m == nil {
			t.Fatalf("no root fingerprint in banner:\n%s", out.String())
		}
		return m[1]
	}
	if a, b := run(), run(); a != b {
		t.Fatalf("restart changed the root: %s then %s", a, b)
	}
}

func TestVersion(t *testing.T) {
	out := meshcaCmd(t, "version")
	if !strings.HasPrefix(out, "meshca dev (commit ") {
		t.Fatalf("version printed %q", out)
	}
}

func httpGet(t *testing.T, url string, want int) string {
	t.Helper()
	body, err := fetch(url, want)
	if err != nil {
		t.Fatal(err)
	}
	return body
}

// fetch GETs url and returns its body, or an error if the status is not
// want: httpGet for polls that wait for a status.
func fetch(url string, want int) (string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		return "", fmt.Errorf("GET %s = %d, want %d: %s", url, resp.StatusCode, want, b)
	}
	return string(b), nil
}

func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestServerWithPluggedInCA(t *testing.T) {
	dir := t.TempDir()
	fixture := filepath.Join("..", "..", "testdata", "cacerts")
	addr := startServer(t, "--ca-dir", fixture, "--data-dir", dir,
		"--authenticator", "dev", "--dev-token-key", filepath.Join(dir, "dev-token-key.pem"),
		"--bundle-out", filepath.Join(dir, "bundle.pem"))
	d := &devServer{dataDir: dir, grpcAddr: addr}
	tokenFile := filepath.Join(dir, "t")
	os.WriteFile(tokenFile, []byte(meshcaCmd(t, "dev", "token", "--data-dir", dir, "-n", "shop", "-s", "cart")), 0o600)
	out := filepath.Join(dir, "cart")
	meshcaCmd(t, "cert", "--addr", d.grpcAddr, "--ca-bundle", filepath.Join(fixture, "root-cert.pem"), "--token-file", tokenFile, "--out", out)

	svid, bundle := loadSVID(t, out)
	fixtureRoot, err := x509bundle.Load(svid.ID.TrustDomain(), filepath.Join(fixture, "root-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if !bundle.Equal(fixtureRoot) {
		t.Fatal("the written trust bundle is not the plugged-in root")
	}
	if _, _, err := x509svid.Verify(svid.Certificates, fixtureRoot); err != nil {
		t.Fatalf("issued chain does not verify against the plugged-in root: %v", err)
	}
	if len(svid.Certificates) != 2 || svid.Certificates[1].Subject.CommonName != "fixture intermediate CA" {
		t.Fatalf("chain should be leaf + the plugged-in intermediate, got %d certificates", len(svid.Certificates))
	}
	written, err := os.ReadFile(filepath.Join(dir, "bundle.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := os.ReadFile(filepath.Join(fixture, "root-cert.pem")); !bytes.Equal(bytes.TrimSpace(written), bytes.TrimSpace(want)) {
		t.Error("--bundle-out does not hold the plugged-in root")
	}
}
