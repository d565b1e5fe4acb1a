package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// centralProxy connects an Envoy-like SDS client, configured as cfg says
// otherwise, to the server's CA port, authenticated with a development
// token for ns/sa, and waits until it holds its certificate and the trust
// bundle. The stream lasts until the test ends or the client disconnects.
func centralProxy(t *testing.T, d *devServer, ns, sa string, cfg sdstest.Config) *sdstest.Client {
	t.Helper()
	roots, err := caclient.LoadBundle(filepath.Join(d.dataDir, devBundleFile))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	host, _, _ := net.SplitHostPort(d.grpcAddr)
	conn, err := grpc.NewClient(d.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: host})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	tok := strings.TrimSpace(meshcaCmd(t, "dev", "token", "--data-dir", d.dataDir, "-n", ns, "-s", sa))
	cfg.Conn, cfg.Node = conn, sa
	cfg.Metadata = metadata.Pairs("authorization", "Bearer "+tok)
	c := sdstest.New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Disconnect)
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	defer wcancel()
	if _, err := c.Wait(wctx, func(s sdstest.State) bool { return s.Has("default", sds.RootsName) }); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestCentralSDS: proxies without a node agent get their certificate and
// the trust bundle from the server's SDS service over TLS, authenticated by
// their token, and use them for a real mTLS handshake.
func TestCentralSDS(t *testing.T) {
	d := startDev(t)
	web := centralProxy(t, d, "default", "web", sdstest.Config{})
	db := centralProxy(t, d, "shop", "db", sdstest.Config{Delta: true})
	for c, want := range map[*sdstest.Client]string{web: "spiffe://cluster.local/ns/default/sa/web", db: "spiffe://cluster.local/ns/shop/sa/db"} {
		svid, err := c.SVID()
		if err != nil {
			t.Fatal(err)
		}
		if svid.ID.String() != want {
			t.Fatalf("SDS served %s, want %s", svid.ID, want)
		}
	}
	serverCfg, err := web.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	clientCfg, err := db.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	errc := make(chan error, 1)
	go func() { errc <- tls.Server(a, serverCfg).Handshake() }()
	cerr := tls.Client(b, clientCfg).Handshake()
	if serr := <-errc; serr != nil || cerr != nil {
		t.Fatalf("mTLS handshake between central-SDS workloads: server %v, client %v", serr, cerr)
	}
}

// TestAgentAgainstDev runs `meshca agent` against `meshca dev` and reads its
// SDS socket as Envoy would: the certificate is for the token's identity,
// and the socket is private.
func TestAgentAgainstDev(t *testing.T) {
	d := startDev(t)
	tok := writeFile(t, "token", []byte(meshcaCmd(t, "dev", "token", "--data-dir", d.dataDir, "-n", "shop", "-s", "cart")))
	sock := filepath.Join(t.TempDir(), "run", "sds.sock")
	ctx, cancel := context.WithCancel(context.Background())
	cmd := newRootCommand(io.Discard, io.Discard)
	cmd.SetArgs([]string{"agent", "--addr", d.grpcAddr, "--ca-bundle", filepath.Join(d.dataDir, devBundleFile), "--token-file", tok, "--socket", sock})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("meshca agent: %v", err)
		}
	}()
	testenv.Eventually(t, "the agent's socket", func() error { _, err := os.Stat(sock); return err })
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v, %v; want mode 0600", fi.Mode(), err)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := sdstest.New(sdstest.Config{Conn: conn, Node: "cart"})
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	defer wcancel()
	if err := c.Connect(wctx); err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect()
	if _, err := c.Wait(wctx, func(s sdstest.State) bool { return s.Has("default", "ROOTCA") }); err != nil {
		t.Fatal(err)
	}
	svid, err := c.SVID()
	if err != nil || svid.ID.String() != "spiffe://cluster.local/ns/shop/sa/cart" {
		t.Fatalf("agent served %v, %v", svid, err)
	}
}
