package main

import (
	"context"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshca/meshca/internal/leader"
	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/sds"
)

// TestBuildPeersOnlyWithLease: replicas electing with a Lease share their
// view through the ConfigMap; a process alone (a lock file) does not; the
// publisher writes the ConfigMap --replicas-configmap names, under the
// Lease's identity.
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
	// New refuses an identity that is no ConfigMap key: the Lease's is one.
	none := rotation.LedgerFunc(func(context.Context, time.Time) ([]rotation.Holding, error) { return nil, nil })
	pub, err := buildPeers(c, srv, none, nil)
	if err != nil || pub == nil {
		t.Fatalf("with a Lease: publisher %v, error %v", pub, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pub.Run(ctx) }()
	testenv.Eventually(t, "the publisher writes its entry", func() error {
		cm, err := client.CoreV1().ConfigMaps("meshca-system").Get(ctx, "shared", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if _, ok := cm.BinaryData[lease.Identity()]; !ok {
			return fmt.Errorf("keys %v, want %s", slices.Collect(maps.Keys(cm.BinaryData)), lease.Identity())
		}
		return nil
	})
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}

	c.authn = nil
	if _, err := buildPeers(c, srv, ledgerHoldings(nil), nil); err == nil || !strings.Contains(err.Error(), "--authenticator=kube") {
		t.Errorf("a Lease without Kubernetes: %v", err)
	}
	if id := lease.Identity(); !regexp.MustCompile(`^.+_[0-9a-f]{8}$`).MatchString(id) {
		t.Errorf("replica identity %q is not host_suffix", id)
	}
}
