package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/meshca/meshca/internal/agent"
	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/keystore"
)

func newAgentCommand(g *globalOptions) *cobra.Command {
	var (
		cfg             agent.Config
		bundle, keyType string
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run next to one proxy: SDS on a Unix socket, workload key generated here, certificates renewed before expiry",
		Long: `Run the node agent for one proxy. It generates the workload key locally (it
never leaves this process), requests certificates from the meshca server with
the pod's projected service-account token (re-read on every request),
renews them at half their lifetime with jitter, follows the server's trust
bundle over SDS, and serves both to Envoy over SDS on --socket.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			roots, err := caclient.LoadBundle(bundle)
			if err != nil {
				return fmt.Errorf("--ca-bundle: %w", err)
			}
			cfg.TrustBundle, cfg.KeyType, cfg.Logger = roots, keystore.KeyType(keyType), log
			a, err := agent.New(cfg)
			if err != nil {
				return err
			}
			return a.Run(cmd.Context())
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&cfg.ServerAddr, "addr", "meshca.meshca-system.svc:15012", "address of the meshca server (CA API and SDS over TLS)")
	fs.StringVar(&bundle, "ca-bundle", "/var/run/secrets/meshca/root-cert.pem", "PEM roots trusted at start to authenticate the server")
	fs.StringVar(&cfg.ServerName, "server-name", "", "expected name in the server's certificate (default: the host of --addr)")
	fs.StringVar(&cfg.ClusterID, "cluster-id", "", "cluster ID sent to a multi-cluster server")
	fs.StringVar(&cfg.TokenFile, "token-file", "/var/run/secrets/tokens/meshca-token", "the pod's projected service-account token (audience meshca)")
	fs.StringVar(&keyType, "key-type", string(keystore.ECDSAP256), "workload key type: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072")
	fs.DurationVar(&cfg.TTL, "ttl", 0, "certificate lifetime to ask for (0: the server's default)")
	fs.StringVar(&cfg.SocketPath, "socket", "/var/run/meshca/sds.sock", "Unix socket Envoy reaches SDS on (mode 0600, directory 0700)")
	fs.Float64Var(&cfg.RenewAt, "renew-at", agent.DefaultRenewAt, "fraction of the lifetime at which to renew")
	fs.Float64Var(&cfg.Jitter, "jitter", agent.DefaultJitter, "random spread around --renew-at, as a fraction of the lifetime")
	fs.DurationVar(&cfg.RetryMin, "retry-min", agent.DefaultRetryMin, "first retry delay after a failure (doubles up to --retry-max)")
	fs.DurationVar(&cfg.RetryMax, "retry-max", agent.DefaultRetryMax, "longest retry delay")
	return cmd
}
