package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"k8s.io/apimachinery/pkg/util/yaml"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/devtoken"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// TestDevServesSDSToEnvoy: `meshca dev` runs a node agent whose socket
// serves the default workload's certificate, verifiable against the trust
// bundle dev writes; `meshca sds watch --once` prints it; the banner's
// Envoy configuration names the socket; and the agent goes away with dev.
func TestDevServesSDSToEnvoy(t *testing.T) {
	d, out, stop := runDev(t)
	sock := filepath.Join(d.dataDir, "sds", "agent.sock")
	token := filepath.Join(d.dataDir, "sds", "token")
	banner := out.String()
	for _, want := range []string{
		"SDS socket     " + sock,
		"identity       spiffe://cluster.local/ns/default/sa/default",
		"agent token    " + token,
		"sds watch --socket " + sock + " --once",
	} {
		if !strings.Contains(banner, want) {
			t.Errorf("banner does not say %q:\n%s", want, banner)
		}
	}
	checkEnvoyConfig(t, banner, sock)

	testenv.Eventually(t, "the agent's socket", func() error { _, err := os.Stat(sock); return err })
	for path, want := range map[string]fs.FileMode{filepath.Dir(sock): fs.ModeDir | 0o700, sock: fs.ModeSocket | 0o600, token: 0o600} {
		if fi, err := os.Stat(path); err != nil || fi.Mode() != want {
			t.Errorf("%s: mode %v (%v), want %v", path, fi.Mode(), err, want)
		}
	}

	// What Envoy would get.
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := sdstest.New(sdstest.Config{Conn: conn, Node: "envoy"})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(ctx, func(s sdstest.State) bool { return s.Has("default", "ROOTCA") }); err != nil {
		t.Fatal(err)
	}
	c.Disconnect()
	svid, err := c.SVID()
	if err != nil {
		t.Fatal(err)
	}
	if got := svid.ID.String(); got != "spiffe://cluster.local/ns/default/sa/default" {
		t.Fatalf("socket served %s", got)
	}
	bundle, err := x509bundle.Load(svid.ID.TrustDomain(), filepath.Join(d.dataDir, devBundleFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		t.Fatalf("served certificate does not verify against root-cert.pem: %v", err)
	}

	// The banner's command, as printed.
	watched := meshcaCmd(t, "sds", "watch", "--socket", sock, "--once")
	for _, want := range []string{
		"spiffe://cluster.local/ns/default/sa/default",
		"serial " + svid.Certificates[0].SerialNumber.Text(16),
		"root " + ca.Fingerprint(bundle.X509Authorities()[0]),
		"sent     ACK (nonce ",
	} {
		if !strings.Contains(watched, want) {
			t.Errorf("sds watch does not print %q:\n%s", want, watched)
		}
	}

	if err := stop(); err != nil {
		t.Fatalf("meshca dev: %v", err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("socket left behind after dev stopped: %v", err)
	}
}

// checkEnvoyConfig parses the two configuration snippets of the banner:
// the cluster must reach the socket over HTTP/2, and the TLS context must
// be a valid Envoy UpstreamTlsContext asking that cluster for "default"
// and "ROOTCA".
func checkEnvoyConfig(t *testing.T, banner, sock string) {
	t.Helper()
	_, rest, _ := strings.Cut(banner, "a cluster for the socket\n")
	clusterYAML, rest, ok := strings.Cut(rest, "\nand in the common_tls_context")
	tlsYAML, _, ok2 := strings.Cut(strings.SplitN(rest, "\n", 2)[1], "\nStop with")
	if !ok || !ok2 {
		t.Fatalf("banner has no Envoy configuration:\n%s", banner)
	}
	var boot struct {
		StaticResources struct {
			Clusters []struct {
				Name            string `json:"name"`
				ProtocolOptions map[string]struct {
					Explicit struct {
						HTTP2 *struct{} `json:"http2_protocol_options"`
					} `json:"explicit_http_config"`
				} `json:"typed_extension_protocol_options"`
				LoadAssignment struct {
					Endpoints []struct {
						LB []struct {
							Endpoint struct {
								Address struct {
									Pipe struct {
										Path string `json:"path"`
									} `json:"pipe"`
								} `json:"address"`
							} `json:"endpoint"`
						} `json:"lb_endpoints"`
					} `json:"endpoints"`
				} `json:"load_assignment"`
			} `json:"clusters"`
		} `json:"static_resources"`
	}
	js, err := yaml.ToJSON([]byte(clusterYAML))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(js, &boot); err != nil {
		t.Fatal(err)
	}
	cl := boot.StaticResources.Clusters
	if len(cl) != 1 || cl[0].Name != "sds-grpc" || len(cl[0].LoadAssignment.Endpoints) != 1 ||
		len(cl[0].LoadAssignment.Endpoints[0].LB) != 1 || cl[0].LoadAssignment.Endpoints[0].LB[0].Endpoint.Address.Pipe.Path != sock ||
		cl[0].ProtocolOptions["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Explicit.HTTP2 == nil {
		t.Errorf("cluster is not sds-grpc on %s over HTTP/2:\n%s", sock, clusterYAML)
	}

	js, err = yaml.ToJSON([]byte(tlsYAML))
	if err != nil {
		t.Fatal(err)
	}
	var tlsCtx tlsv3.UpstreamTlsContext
	if err := protojson.Unmarshal(js, &tlsCtx); err != nil {
		t.Fatalf("TLS context is not Envoy's: %v\n%s", err, tlsYAML)
	}
	common := tlsCtx.GetCommonTlsContext()
	certs := common.GetTlsCertificateSdsSecretConfigs()
	roots := common.GetValidationContextSdsSecretConfig()
	if len(certs) != 1 || certs[0].GetName() != "default" || roots.GetName() != "ROOTCA" {
		t.Fatalf("TLS context asks for %v and %q", certs, roots.GetName())
	}
	for _, c := range []*tlsv3.SdsSecretConfig{certs[0], roots} {
		src := c.GetSdsConfig().GetApiConfigSource()
		if g := src.GetGrpcServices(); len(g) != 1 || g[0].GetEnvoyGrpc().GetClusterName() != "sds-grpc" || src.GetApiType().String() != "GRPC" {
			t.Errorf("secret %q is not fetched from sds-grpc over gRPC: %v", c.GetName(), src)
		}
	}
}

// TestDevAgentPlan: what dev does about its agent for each combination of
// flags, and what the banner then says.
func TestDevAgentPlan(t *testing.T) {
	tokens, err := newDevAuthority("cluster.local", filepath.Join(t.TempDir(), "key.pem"), discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, tc := range []struct {
		name      string
		sds       devSDSOptions
		kube      bool
		off, err  string
		tokenFile string
		banner    string
	}{
		{name: "default", tokenFile: filepath.Join(dir, "sds", "token"),
			banner: "identity       spiffe://cluster.local/ns/default/sa/default"},
		{name: "other workload", sds: devSDSOptions{namespace: "shop", account: "cart"}, tokenFile: filepath.Join(dir, "sds", "token"),
			banner: "identity       spiffe://cluster.local/ns/shop/sa/cart"},
		{name: "turned off", sds: devSDSOptions{socketSet: true}, off: `off (--sds-socket "")`},
		{name: "kube without token", kube: true, off: "--sds-token-file", banner: "Node agent (SDS for Envoy): off: with --kubeconfig"},
		{name: "kube, socket asked for, no token", kube: true, sds: devSDSOptions{socket: "/tmp/x.sock", socketSet: true}, err: "needs --sds-token-file"},
		{name: "kube with token", kube: true, sds: devSDSOptions{tokenFile: "/run/token"}, tokenFile: "/run/token",
			banner: "identity       the one /run/token proves"},
		{name: "bad namespace", sds: devSDSOptions{namespace: "Not_A_Label", account: "x"}, err: "--sds-namespace"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := &devOptions{dataDir: dir, sds: tc.sds}
			o.ca.trustDomain = "cluster.local"
			if o.sds.namespace == "" {
				o.sds.namespace, o.sds.account = "default", "default"
			}
			tok := tokens
			if tc.kube {
				tok = nil
			}
			p, err := o.planAgent(tok)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("planAgent = %v, want an error about %s", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(p.off, tc.off) || (tc.off == "") != (p.off == "") {
				t.Errorf("off = %q, want %q", p.off, tc.off)
			}
			if p.tokenFile != tc.tokenFile {
				t.Errorf("token file %q, want %q", p.tokenFile, tc.tokenFile)
			}
			if got := p.banner("meshca"); !strings.Contains(got, tc.banner) {
				t.Errorf("banner does not say %q:\n%s", tc.banner, got)
			}
		})
	}
}

// TestDevRenewsTheAgentToken: the token file is replaced at half the
// token's lifetime, and a failure is retried soon after.
func TestDevRenewsTheAgentToken(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tokens, err := newDevAuthority("cluster.local", filepath.Join(t.TempDir(), "key.pem"), discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	clock := clockwork.NewFakeClock()
	m := &tokenMinter{tokens: tokens, path: filepath.Join(dir, "token"), clock: clock, log: discardLogger(),
		req: devtoken.MintRequest{Namespace: "default", ServiceAccount: "default", TTL: time.Hour}}
	if err := m.mint(); err != nil {
		t.Fatal(err)
	}
	first := readFile(t, m.path)
	done := make(chan error, 1)
	go func() { done <- m.run(ctx) }()

	if err := clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	clock.Advance(30*time.Minute - time.Second)
	if got := readFile(t, m.path); got != first {
		t.Fatal("token replaced before half its lifetime")
	}
	clock.Advance(time.Second)
	// The timer is armed again once the new token is written.
	if err := clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	second := readFile(t, m.path)
	if second == first {
		t.Fatal("token not replaced at half its lifetime")
	}
	if _, err := tokens.Authenticate(ctx, credentialOf(second)); err != nil {
		t.Fatalf("renewed token refused: %v", err)
	}

	// A failure (the directory is gone) is retried a minute later.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	clock.Advance(30 * time.Minute)
	if err := clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	clock.Advance(tokenRetry)
	if err := clock.BlockUntilContext(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if readFile(t, m.path) == "" {
		t.Fatal("no token after the retry")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	return string(b)
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func credentialOf(token string) identity.Credential {
	return identity.Credential{Token: strings.TrimSpace(token)}
}

// TestSDSWatchFollowsChanges: without --once, `meshca sds watch` prints
// every version as it arrives, and Ctrl-C ends it without an error.
func TestSDSWatchFollowsChanges(t *testing.T) {
	pki, err := newBenchPKI(1)
	if err != nil {
		t.Fatal(err)
	}
	bc := sds.NewBroadcaster()
	if err := bc.Set(sds.Snapshot{Chain: pki.chain, Key: pki.key, Roots: []*x509.Certificate{pki.root}}); err != nil {
		t.Fatal(err)
	}
	srv, err := sds.New(sds.Config{Source: bc})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "sds.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	sdstest.Serve(t, srv, lis)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := &syncBuffer{}
	done := make(chan error, 1)
	go func() { done <- (&sdsWatchOptions{socket: sock, node: "test", timeout: time.Minute}).run(ctx, out) }()
	testenv.Eventually(t, "the first response is printed", func() error {
		if !strings.Contains(out.String(), "sent     ACK") {
			return errors.New("not yet")
		}
		return nil
	})
	if err := bc.Set(sds.Snapshot{Chain: pki.chain, Key: pki.key, Roots: []*x509.Certificate{pki.root, pki.extra[0]}}); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "the new bundle is printed", func() error {
		if strings.Count(out.String(), "sent     ACK") != 2 {
			return errors.New("not yet")
		}
		return nil
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("watch ended with %v", err)
	}
	second := out.String()[strings.LastIndex(out.String(), "\nresponse"):]
	for _, want := range []string{"ROOTCA   2 root(s)", "root " + ca.Fingerprint(pki.root), "root " + ca.Fingerprint(pki.extra[0])} {
		if !strings.Contains(second, want) {
			t.Errorf("second response does not say %q:\n%s", want, second)
		}
	}
	if strings.Contains(second, "default ") {
		t.Errorf("second response printed a certificate it did not carry:\n%s", second)
	}
}
