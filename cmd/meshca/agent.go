package main

import (
	"fmt"
	"net/netip"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/internal/agent"
	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
	"github.com/meshca/meshca/keystore"
)

func newAgentCommand(g *globalOptions) *cobra.Command {
	var (
		cfg                    agent.Config
		bundle, keyType        string
		inboundListen, appAddr string
		trustDomain            string
		destinations           []string
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run next to one proxy: SDS on a Unix socket, workload key generated here, certificates renewed before expiry",
		Long: `Run the node agent for one proxy. It generates the workload key locally (it
never leaves this process), requests certificates from the meshca server with
the pod's projected service-account token (re-read on every request),
renews them at half their lifetime with jitter, follows the server's trust
bundle over SDS, and serves both to Envoy over SDS on --socket.

With --envoy-config-dir it also enforces the mesh's mTLS policy: it follows
the policy over the same SDS stream and writes the proxy's Envoy
configuration into the directory (lds.json and cds.json, rendered from
--service-fqdn, --inbound-listen, --inbound-app and --destination), again on
every change of the policy, then bootstrap.json once, after the first
lds.json and cds.json: start Envoy with -c <dir>/bootstrap.json once that
file exists. Nothing is written before the server's policy arrives; after
--policy-wait without one (or at once if the server serves none), the
configuration of an earlier run found in the directory is kept, or else a
fail-closed one (mTLS STRICT for every service but the Kubernetes API) is
written until the policy arrives.`,
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
			if cfg.EnvoyConfigDir != "" {
				if cfg.Proxy.Service.Listen, err = netip.ParseAddrPort(inboundListen); err != nil {
					return fmt.Errorf("--inbound-listen: %w", err)
				}
				if cfg.Proxy.Service.App, err = netip.ParseAddrPort(appAddr); err != nil {
					return fmt.Errorf("--inbound-app: %w", err)
				}
				if trustDomain != "" {
					if cfg.Proxy.TrustDomain, err = spiffeid.TrustDomainFromString(trustDomain); err != nil {
						return fmt.Errorf("--trust-domain: %w", err)
					}
				}
				for _, s := range destinations {
					d, err := envoyconfig.ParseDestination(s)
					if err != nil {
						return fmt.Errorf("--destination: %w", err)
					}
					cfg.Proxy.Destinations = append(cfg.Proxy.Destinations, d)
				}
			}
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

	fs.StringVar(&cfg.EnvoyConfigDir, "envoy-config-dir", "", `directory for the proxy's Envoy configuration rendered from the mesh's mTLS policy (lds.json, cds.json, bootstrap.json); "" renders none and does not ask for the policy`)
	fs.StringVar(&cfg.Proxy.Service.FQDN, "service-fqdn", "", "FQDN of the local service, as the mTLS policy names it (with --envoy-config-dir)")
	fs.StringVar(&inboundListen, "inbound-listen", "0.0.0.0:15006", "ip:port of the inbound listener, which terminates mTLS as the policy says")
	fs.StringVar(&appAddr, "inbound-app", "127.0.0.1:8080", "ip:port of the local application the inbound listener forwards to")
	fs.StringArrayVar(&destinations, "destination", nil, "a service the application reaches through the proxy, as fqdn=host:port[@listen]: "+
		"host:port is its endpoint (IP or DNS name), listen the ip:port of the outbound listener (default 127.0.0.1:<port>); "+
		"the proxy originates mTLS unless the policy disables it for fqdn; repeat for each")
	fs.StringVar(&trustDomain, "trust-domain", "cluster.local", `trust domain whose SPIFFE IDs peers must present; "" accepts any certificate that chains to the trust bundle`)
	fs.DurationVar(&cfg.PolicyWait, "policy-wait", agent.DefaultPolicyWait, "how long to wait for the server's first mTLS policy before writing a fallback configuration (negative: wait as long as it takes)")
	return cmd
}
