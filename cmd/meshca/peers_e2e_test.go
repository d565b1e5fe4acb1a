package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// TestRootGateCountsEveryReplica runs two `meshca server` replicas that
// elect a leader with a Lease on a real API server, and one proxy on
// central SDS connected to the follower only. `root status` on either
// replica counts that proxy, its ACK and the certificate the follower
// issued it; once the proxy rejects the prepared root, the leader refuses
// activate, naming it. The leader alone would have seen no proxy at all.
func TestRootGateCountsEveryReplica(t *testing.T) {
	env := testenv.StartKube(t)
	env.CreateNamespace(t, "meshca-system")
	env.CreateServiceAccount(t, "shop", "cart")
	token := env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, nil)
	shared := []string{"--namespace", "meshca-system", "--kubeconfig", env.Kubeconfig(),
		"--keystore", "disk", "--keystore-dir", filepath.Join(t.TempDir(), "keys"),
		"--keystore-passphrase-file", writeFile(t, "pass", []byte("correct horse battery staple")),
		"--intermediates", "per-replica", "--ca-journal", "secret", "--ca-maintain-interval", "1s",
		"--leader-election", "lease"}
	a, b := newServerReplica(t, "a", shared), newServerReplica(t, "b", shared)
	a.start(t)
	b.start(t)
	var lead, follow *serverReplica
	testenv.Eventually(t, "one replica leads", func() error {
		for _, r := range [][2]*serverReplica{{a, b}, {b, a}} {
			if g, err := r[0].leading(); err == nil && g == 1 {
				lead, follow = r[0], r[1]
				return nil
			}
		}
		return errors.New("no replica leads")
	})

	roots, err := caclient.LoadBundle(follow.bundle)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	host, _, _ := net.SplitHostPort(follow.grpc)
	conn, err := grpc.NewClient(follow.grpc, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: host})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	proxy := sdstest.New(sdstest.Config{Conn: conn, Node: "cart-node", Metadata: metadata.Pairs("authorization", "Bearer "+token),
		Reject: func(sec *tlsv3.Secret) error {
			if n := bundleSize(sec); n > 1 {
				return fmt.Errorf("%s, got %d", gateRejection, n)
			}
			return nil
		}})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := proxy.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Disconnect)
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	defer wcancel()
	if _, err := proxy.Wait(wctx, func(s sdstest.State) bool { return s.Has("default", sds.RootsName) }); err != nil {
		t.Fatal(err)
	}

	for _, r := range []*serverReplica{lead, follow} {
		testenv.Eventually(t, r.name+"'s root status counts the follower's proxy and its certificate", func() error {
			st, err := r.status()
			if err != nil {
				return err
			}
			if st.Proxies != 1 || st.Roots[0].AckedProxies != 1 || st.Roots[0].LiveLeaves < 1 {
				return fmt.Errorf("%d proxies, %d ACKed the root, %d live certificates", st.Proxies, st.Roots[0].AckedProxies, st.Roots[0].LiveLeaves)
			}
			return nil
		})
	}

	meshcaCmd(t, "root", "prepare", "--admin-socket", lead.socket)
	cart := "spiffe://cluster.local/ns/shop/sa/cart"
	testenv.Eventually(t, "the leader sees the proxy on the follower reject the new root", func() error {
		st, err := lead.status()
		if err != nil {
			return err
		}
		if len(st.Missing) != 1 || st.Missing[0].Identity != cart || st.Missing[0].Node != "cart-node" ||
			st.Missing[0].State != rotation.StateRejected || !strings.Contains(st.Missing[0].Error, gateRejection) {
			return fmt.Errorf("missing %+v", st.Missing)
		}
		return nil
	})
	_, _, err = meshcaRun("root", "activate", "--admin-socket", lead.socket)
	var apiErr *admin.APIError
	if !errors.As(err, &apiErr) || apiErr.HTTPStatus != http.StatusConflict || !strings.Contains(apiErr.Body.Error, "1 rejected it (NACK)") {
		t.Fatalf("root activate on the leader: %v, want 409 for the rejecting proxy", err)
	}
	st, err := lead.status()
	if err != nil {
		t.Fatal(err)
	}
	if st.Phase != ca.PhasePrepared {
		t.Fatalf("phase %s after a refused activate", st.Phase)
	}
}
