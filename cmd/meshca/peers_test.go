package main

import (
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshca/meshca/internal/leader"
	"github.com/meshca/meshca/internal/peers"
	"github.com/meshca/meshca/sds"
)

// TestBuildPeersOnlyWithLease: replicas electing with a Lease share their
// view through the ConfigMap; a process alone (a lock file) does not; the
// flags reach the publisher.
func TestBuildPeersOnlyWithLease(t *testing.T) {
	var o peersOptions
	fs := pflag.NewFlagSet("server", pflag.ContinueOnError)
	o.bind(fs)
	if err := fs.Parse([]string{"--replicas-configmap=shared", "--replicas-interval=2s"}); err != nil {
		t.Fatal(err)
	}
	if o.configMap != "shared" || o.interval != 2*time.Second {
		t.Fatalf("flags parsed into %+v", o)
	}

	client := fake.NewClientset()
	lease, err := leader.NewLease(leader.LeaseConfig{Client: client, Namespace: "meshca-system", Name: "meshca-leader"})
	if err != nil {
		t.Fatal(err)
	}
	file, err := fileElector(t.TempDir(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := sds.New(sds.Config{Source: sds.NewBroadcaster()})
	if err != nil {
		t.Fatal(err)
	}
	c := stackConfig{listen: listenOptions{namespace: "meshca-system"}, peers: o, authn: &kubeAuth{client: client}}

	c.elector = file
	if pub, err := buildPeers(c, srv, ledgerHoldings(nil), nil); pub != nil || err != nil {
		t.Errorf("with a lock file: publisher %v, error %v; want neither", pub, err)
	}
	c.elector = lease
	pub, err := buildPeers(c, srv, ledgerHoldings(nil), nil)
	if err != nil || pub == nil {
		t.Fatalf("with a Lease: publisher %v, error %v", pub, err)
	}
	c.authn = nil
	if _, err := buildPeers(c, srv, ledgerHoldings(nil), nil); err == nil || !strings.Contains(err.Error(), "--authenticator=kube") {
		t.Errorf("a Lease without Kubernetes: %v", err)
	}
	if _, err := peers.New(peers.Config{Client: client, Namespace: "x", Identity: lease.Identity(), Proxies: srv, Ledger: ledgerHoldings(nil)}); err != nil {
		t.Errorf("the replica identity is no ConfigMap key: %v", err)
	}
	if id := lease.Identity(); !regexp.MustCompile(`^.+_[0-9a-f]{8}$`).MatchString(id) {
		t.Errorf("replica identity %q is not host_suffix", id)
	}
}
