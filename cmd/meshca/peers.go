package main

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"

	"github.com/meshca/meshca/internal/leader"
	"github.com/meshca/meshca/internal/peers"
	"github.com/meshca/meshca/internal/rotation"
)

// peersOptions shape the view the replicas share of their proxies and
// certificates (internal/peers). The zero value is the defaults.
type peersOptions struct {
	configMap string
	interval  time.Duration
}

func (o *peersOptions) bind(fs *pflag.FlagSet) {
	fs.StringVar(&o.configMap, "replicas-configmap", peers.DefaultName, "with --leader-election=lease: the ConfigMap in --namespace where each replica publishes which trust bundles its proxies have ACKed and which certificates it issued, so that root rotation's gates count every replica's")
	fs.DurationVar(&o.interval, "replicas-interval", peers.DefaultInterval, "with --leader-election=lease: how often each replica rewrites its entry in --replicas-configmap and reads the others'; a replica whose entry is older than 3 times this counts as gone")
}

// buildPeers returns the publisher of this replica's part of the shared
// view when replicas elect their leader with a Lease, each with its own SDS
// streams and ledger; nil in dev and with a lock file, whose gates keep to
// this process's own view.
func buildPeers(c stackConfig, proxies rotation.Proxies, ledger rotation.Ledger, reg prometheus.Registerer) (*peers.Publisher, error) {
	if _, ok := c.elector.(*leader.Lease); !ok {
		return nil, nil
	}
	k, ok := c.authn.(*kubeAuth)
	if !ok {
		return nil, fmt.Errorf("the Lease election shares rotation between replicas; it needs --authenticator=kube")
	}
	return peers.New(peers.Config{
		Client: k.client, Namespace: c.listen.namespace, Name: c.peers.configMap, Identity: c.elector.Identity(),
		Proxies: proxies, Ledger: ledger, Interval: c.peers.interval, Logger: c.log, Metrics: reg,
	})
}
