package main

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/devtoken"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/kubestate"
)

type serverOptions struct {
	ca            caOptions
	listen        listenOptions
	dataDir       string
	keys          keystoreOptions
	replicas      replicaOptions
	peers         peersOptions
	authenticator string
	kube          kubeOptions
	devTokenKey   string
	bundleOut     string
	bundleCM      string
	sdsRootsOnly  bool
	auditDir      string
	auditStdout   bool
	auditDelay    time.Duration
	admin         adminOptions
	mtls          mtlsOptions
}

func newServerCommand(g *globalOptions) *cobra.Command {
	o := &serverOptions{}
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run the meshca CA server",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			// In a pod, meshca's namespace is the pod's unless told otherwise.
			if in := inClusterNamespace(); in != "" && !cmd.Flags().Changed("namespace") {
				o.listen.namespace = in
			}
			c := stackConfig{ca: o.ca, listen: o.listen, journalPath: filepath.Join(o.dataDir, "ca-journal.json"),
				registry: newRegistry(), sdsRootsOnly: o.sdsRootsOnly, auditDir: o.auditDir, auditCommitDelay: o.auditDelay, admin: o.admin, log: log,
				mtls: o.mtls.inDataDir(o.dataDir), peers: o.peers}
			if c.admin.socket == "" {
				c.admin.socket = filepath.Join(o.dataDir, "admin", "admin.sock")
			}
			if c.auditDir == "" {
				c.auditDir = filepath.Join(o.dataDir, "audit")
			}
			if o.auditStdout {
				c.auditMirror = cmd.OutOrStdout()
			}
			if o.ca.caDir == "" {
				o.keys.kube, o.keys.namespace = o.kube.restConfig, o.listen.namespace
				k, err := o.keys.open(ctx, o.dataDir, c.registry, log)
				if err != nil {
					return err
				}
				c.keys, c.perReplica, c.keysRun = k.keys, k.perReplica, k.run
			}
			if c.authn, err = o.buildAuthenticator(ctx, c.registry, log); err != nil {
				return err
			}
			if c.elector, c.journal, err = o.replicas.build(c.authn, o.listen.namespace, o.dataDir, c.registry, log); err != nil {
				return err
			}
			st, err := buildStack(ctx, c)
			if err != nil {
				return err
			}
			if st.bundleCM, err = o.bundlePublisher(c.authn); err != nil {
				return err
			}
			return st.run(ctx, o.bundleOut)
		},
	}
	fs := cmd.Flags()
	o.ca.bind(fs)
	o.listen.bind(fs, "", []string{"meshca", "meshca.meshca-system", "meshca.meshca-system.svc", "localhost"}, []string{"127.0.0.1"})
	fs.StringVar(&o.dataDir, "data-dir", "/var/lib/meshca", "directory for the CA journal and, by default, the disk keystore")
	o.keys.bind(fs, false)
	o.replicas.bind(fs)
	o.peers.bind(fs)
	fs.StringVar(&o.authenticator, "authenticator", "kube", "how workload tokens are verified: kube (Kubernetes TokenReview) or dev (meshca's development token issuer)")
	o.kube.bind(fs, "kubeconfig of the local cluster (default: the in-cluster configuration)", true)
	fs.StringVar(&o.devTokenKey, "dev-token-key", "", "with --authenticator=dev: the development token signing key (PEM)")
	fs.StringVar(&o.bundleOut, "bundle-out", "", "write the trust bundle (PEM) to this file and keep it current")
	fs.StringVar(&o.bundleCM, "bundle-configmap", kubestate.DefaultBundleName, `with --authenticator=kube: the ConfigMap in --namespace where the leader publishes the trust bundle (key root-cert.pem) and keeps it current; "" publishes none`)
	fs.StringVar(&o.auditDir, "audit-dir", "", "directory of the audit ledger (default <data-dir>/audit)")
	fs.DurationVar(&o.auditDelay, "audit-commit-delay", audit.DefaultCommitDelay, "under load, space the audit ledger's group commits (one fsync each) by this much, so each carries more records; appends further apart never wait (negative: never wait)")
	fs.BoolVar(&o.auditStdout, "audit-stdout", false, "also write every audit record to stdout as a JSON line, once it is on disk (for log shippers)")
	o.admin.bind(fs, true)
	o.mtls.bind(fs, true)
	fs.BoolVar(&o.sdsRootsOnly, "sds-roots-only", false, "serve only the trust bundle (ROOTCA) over SDS on --grpc-addr, never workload keys (proxies then need the node agent)")
	return cmd
}

func (o *serverOptions) buildAuthenticator(ctx context.Context, reg prometheus.Registerer, log *slog.Logger) (identity.Authenticator, error) {
	switch o.authenticator {
	case "kube":
		return o.kube.build(ctx, o.ca.trustDomain, o.listen.namespace, reg, log)
	case "dev":
		if o.devTokenKey == "" {
			return nil, fmt.Errorf("--authenticator=dev needs --dev-token-key")
		}
		return newDevAuthority(o.ca.trustDomain, o.devTokenKey, log)
	default:
		return nil, fmt.Errorf("--authenticator must be kube or dev, not %q", o.authenticator)
	}
}

func newDevAuthority(trustDomain, keyFile string, log *slog.Logger) (*devtoken.Authority, error) {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return nil, fmt.Errorf("--trust-domain: %w", err)
	}
	return devtoken.New(devtoken.Config{KeyFile: keyFile, TrustDomain: td, Logger: log})
}
