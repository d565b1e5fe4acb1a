package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/sds/sdstest"
)

// centralProxy connects an Envoy-like SDS client to the server's CA port,
// authenticated with a development token for ns/sa, and waits for both
// secrets.
func centralProxy(t *testing.T, d *devServer, ns, sa string, delta bool) *sdstest.Client {
	t.Helper()
	roots, err := caclient.LoadBundle(filepath.Join(d.dataDir, "root-cert.pem"))
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
	c := sdstest.New(sdstest.Config{Conn: conn, Node: sa, Delta: delta, Metadata: metadata.Pairs("authorization", "Bearer "+tok)})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Disconnect)
	if _, err := c.Wait(ctx, func(s sdstest.State) bool { return s.Has("default", "ROOTCA") }); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestCentralSDS: proxies without a node agent get their certificate and
// the trust bundle from the server's SDS service over TLS, authenticated by
// their token, and use them for a real mTLS handshake.
func TestCentralSDS(t *testing.T) {
	d := startDev(t)
	web := centralProxy(t, d, "default", "web", false)
	db := centralProxy(t, d, "shop", "db", true)
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
