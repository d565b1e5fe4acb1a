package main

import (
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/kubestate"
	"github.com/meshca/meshca/internal/leader"
)

// replicaOptions say how server replicas share the CA: where the journal
// lives and how the one that drives root rotation is chosen.
type replicaOptions struct {
	election      string
	lease         string
	journal       string
	journalSecret string
}

func (o *replicaOptions) bind(fs *pflag.FlagSet) {
	fs.StringVar(&o.election, "leader-election", "", "how the replica that drives root rotation is chosen: lease (a Lease in --namespace, needs --authenticator=kube) or file (a lock file in --data-dir, for replicas on one machine); default lease with --authenticator=kube, else file")
	fs.StringVar(&o.lease, "leader-lease", "meshca-leader", "with --leader-election=lease: the Lease's name")
	fs.StringVar(&o.journal, "ca-journal", "file", "where the CA journal (roots and rotation phase) lives: file (<data-dir>/ca-journal.json) or secret (a Secret in --namespace, shared by replicas; needs --authenticator=kube)")
	fs.StringVar(&o.journalSecret, "ca-journal-secret", kubestate.DefaultName, "with --ca-journal=secret: the Secret's name")
}

// build returns the elector and the journal store; a nil store is the
// journal file in the data directory (stackConfig.journalPath).
func (o *replicaOptions) build(authn any, namespace, dataDir string, reg prometheus.Registerer, log *slog.Logger) (leader.Elector, ca.JournalStore, error) {
	k, isKube := authn.(*kubeAuth)
	election := o.election
	if election == "" {
		election = "file"
		if isKube {
			election = "lease"
		}
	}
	var (
		el  leader.Elector
		err error
	)
	switch election {
	case "lease":
		if !isKube {
			return nil, nil, fmt.Errorf("--leader-election=lease needs --authenticator=kube")
		}
		el, err = leader.NewLease(leader.LeaseConfig{Client: k.client, Namespace: namespace, Name: o.lease, Logger: log, Metrics: reg})
	case "file":
		el, err = fileElector(dataDir, reg, log)
	default:
		return nil, nil, fmt.Errorf("--leader-election must be lease or file, not %q", election)
	}
	if err != nil {
		return nil, nil, err
	}
	var journal ca.JournalStore
	switch o.journal {
	case "file":
	case "secret":
		if !isKube {
			return nil, nil, fmt.Errorf("--ca-journal=secret needs --authenticator=kube")
		}
		if journal, err = kubestate.NewSecretJournal(kubestate.Config{Client: k.client, Namespace: namespace, Name: o.journalSecret}); err != nil {
			return nil, nil, err
		}
	default:
		return nil, nil, fmt.Errorf("--ca-journal must be file or secret, not %q", o.journal)
	}
	return el, journal, nil
}

// fileElector is the election of replicas that share a data directory.
func fileElector(dataDir string, reg prometheus.Registerer, log *slog.Logger) (leader.Elector, error) {
	return leader.NewFileLock(leader.FileLockConfig{Path: filepath.Join(dataDir, "leader.lock"), Logger: log, Metrics: reg})
}
