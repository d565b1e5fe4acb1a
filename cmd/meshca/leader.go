package main

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

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
	leaseDuration time.Duration
	renewDeadline time.Duration
	retryPeriod   time.Duration
	journal       string
	journalSecret string
}

func (o *replicaOptions) bind(fs *pflag.FlagSet) {
	fs.StringVar(&o.election, "leader-election", "", "how the replica that drives root rotation is chosen: lease (a Lease in --namespace, needs --authenticator=kube) or file (a lock file in --data-dir, for replicas on one machine); default lease with --authenticator=kube, else file")
	fs.StringVar(&o.lease, "leader-lease", "meshca-leader", "with --leader-election=lease: the Lease's name")
	fs.DurationVar(&o.leaseDuration, "leader-lease-duration", leader.DefaultLeaseDuration, "with --leader-election=lease: how long the Lease stays the leader's after its last renewal (whole seconds), so how long the others wait before replacing a leader that died; shorter hands over faster, but a leader must renew within it under any load")
	fs.DurationVar(&o.renewDeadline, "leader-renew-deadline", leader.DefaultRenewDeadline, "with --leader-election=lease: a leader that has not renewed the Lease for this long stops leading; --leader-lease-duration must exceed it and --leader-retry-period together (and 1s more with a retry period under 1s), so it stops before another replica may start")
	fs.DurationVar(&o.retryPeriod, "leader-retry-period", leader.DefaultRetryPeriod, "with --leader-election=lease: how often the leader renews the Lease and the others try to take it; shorter notices a dead leader sooner, at the cost of more writes and reads on the API server (one each per replica and period)")
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
		if err := o.checkLeaseTimings(); err != nil {
			return nil, nil, err
		}
		el, err = leader.NewLease(leader.LeaseConfig{Client: k.client, Namespace: namespace, Name: o.lease,
			LeaseDuration: o.leaseDuration, RenewDeadline: o.renewDeadline, RetryPeriod: o.retryPeriod, Logger: log, Metrics: reg})
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

// checkLeaseTimings applies leader.CheckTimings to the flags, naming them:
// unlike a LeaseConfig's zero, a flag set to 0 is refused, not defaulted.
func (o *replicaOptions) checkLeaseTimings() error {
	if err := leader.CheckTimings(o.leaseDuration, o.renewDeadline, o.retryPeriod); err != nil {
		return fmt.Errorf("--leader-lease-duration (%v), --leader-renew-deadline (%v), --leader-retry-period (%v): %w",
			o.leaseDuration, o.renewDeadline, o.retryPeriod, err)
	}
	return nil
}

// fileElector is the election of replicas that share a data directory.
func fileElector(dataDir string, reg prometheus.Registerer, log *slog.Logger) (leader.Elector, error) {
	return leader.NewFileLock(leader.FileLockConfig{Path: filepath.Join(dataDir, "leader.lock"), Logger: log, Metrics: reg})
}
