package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/meshca/meshca/identity/devtoken"
	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/internal/loadgen"
)

func newBenchCommand(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure meshca's performance on this machine",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newBenchCSRCommand(g), newBenchSDSCommand(g), newBenchSDSFleetCommand())
	return cmd
}

type benchCSROptions struct {
	inProcess   bool
	addr        string
	bundle      string
	serverName  string
	tokenFile   string
	devDataDir  string
	trustDomain string
	namespace   string
	account     string
	cfg         loadgen.Config
	keys        keystoreOptions
	// cleanup removes what inProcessKeys made.
	cleanup func()
}

func newBenchCSRCommand(g *globalOptions) *cobra.Command {
	o := &benchCSROptions{}
	cmd := &cobra.Command{
		Use:   "csr",
		Short: "Load a CA server with CreateCertificate requests and report certificates/s and latency",
		Long: `Load a meshca server on this machine with concurrent CreateCertificate
requests over TLS for a fixed time, then report certificates per second,
latency percentiles and errors by gRPC code, next to in-process reference
rates measured in the same run: the bare x509.CreateCertificate of a P-256
SVID (the baseline), and Authority.Issue (the minimum crypto per issuance).

With no target, or with --in-process, it starts its own server on 127.0.0.1
(self-managed CA with in-memory keys, development token authenticator) and
needs no setup. To load a running server give --addr and --ca-bundle with a
--token-file, or --dev-data-dir to mint a token the way "meshca dev token"
does. Only loopback addresses are accepted.

Client keys and CSRs are generated before the timed phase, and every client
makes one untimed request first, so neither key generation nor TLS
handshakes are counted. With --rate, latency is measured from when each
request was due, so a server that falls behind shows it.`,
		Example: `  # everything in one process, as fast as it goes
  meshca bench csr --in-process

  # latency at a fixed load, e.g. half of the peak rate measured above
  meshca bench csr --in-process --rate 600

  # against a running "meshca dev"
  meshca bench csr --dev-data-dir .meshca-dev --addr 127.0.0.1:15012`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			defer func() {
				if o.cleanup != nil {
					o.cleanup()
				}
			}()
			cfg, err := o.config(cmd.Context(), cmd.Flags().Changed("addr"), log)
			if err != nil {
				return err
			}
			res, err := loadgen.Run(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			return res.WriteText(cmd.OutOrStdout())
		},
	}
	fs := cmd.Flags()
	fs.BoolVar(&o.cfg.Audit, "audit", false, "with --in-process: record every issuance in an audit ledger (synced before the answer), as meshca server does")
	fs.DurationVar(&o.cfg.AuditCommitDelay, "audit-commit-delay", 0, "with --audit: the ledger's --audit-commit-delay (0: its default; negative: never wait)")
	fs.BoolVar(&o.inProcess, "in-process", false, "start a server in this process on 127.0.0.1 and load it (the default when no --addr, --token-file or --dev-data-dir is given)")
	fs.StringVar(&o.addr, "addr", "127.0.0.1:15012", "address of the server to load; loopback only")
	fs.StringVar(&o.bundle, "ca-bundle", "", "PEM trust bundle that authenticates the server (default with --dev-data-dir: its root-cert.pem)")
	fs.StringVar(&o.serverName, "server-name", "", "expected name in the server's certificate (default: the host of --addr)")
	fs.StringVar(&o.tokenFile, "token-file", "", "file holding the token sent with every request")
	fs.StringVar(&o.devDataDir, "dev-data-dir", "", `data directory of a running "meshca dev": mint the token with its development token key`)
	fs.StringVar(&o.trustDomain, "trust-domain", "cluster.local", "with --dev-data-dir: trust domain of the dev server")
	fs.StringVar(&o.namespace, "namespace", loadgen.WorkloadNamespace, "with --dev-data-dir: namespace of the token's workload")
	fs.StringVar(&o.account, "service-account", loadgen.WorkloadServiceAccount, "with --dev-data-dir: service account of the token's workload")
	fs.IntVar(&o.cfg.Concurrency, "concurrency", loadgen.DefaultConcurrency(), "concurrent clients, each with one request in flight")
	fs.IntVar(&o.cfg.Connections, "connections", 0, "TLS connections shared by the clients (default: one per client)")
	fs.DurationVar(&o.cfg.Duration, "duration", loadgen.DefaultDuration, "length of the timed phase")
	fs.Float64Var(&o.cfg.Rate, "rate", 0, "total requests per second; 0: as fast as the server answers")
	fs.IntVar(&o.cfg.MaxRequests, "max-requests", loadgen.DefaultMaxRequests, "stop the timed phase after this many requests")
	fs.DurationVar(&o.cfg.Timeout, "timeout", loadgen.DefaultTimeout, "timeout of each request")
	fs.IntVar(&o.cfg.CSRPool, "csr-pool", loadgen.DefaultCSRPool, "client keys and CSRs generated before timing and used in turn")
	fs.DurationVar(&o.cfg.ReferenceDuration, "reference-duration", loadgen.DefaultReferenceDuration, "length of each in-process reference measurement")
	o.keys.bind(fs, true)
	return cmd
}

// config resolves the target flags into a loadgen.Config.
func (o *benchCSROptions) config(ctx context.Context, addrSet bool, log *slog.Logger) (loadgen.Config, error) {
	cfg := o.cfg
	cfg.Logger = log
	remote := addrSet || o.tokenFile != "" || o.devDataDir != "" || o.bundle != ""
	if o.inProcess || !remote {
		if remote {
			return cfg, fmt.Errorf("--in-process starts its own server; it does not take --addr, --ca-bundle, --token-file or --dev-data-dir")
		}
		cfg.InProcess = true
		return cfg, o.inProcessKeys(ctx, &cfg, log)
	}

	cfg.Addr, cfg.ServerName = o.addr, o.serverName
	bundlePath := o.bundle
	switch {
	case o.tokenFile != "" && o.devDataDir != "":
		return cfg, fmt.Errorf("give --token-file or --dev-data-dir, not both")
	case o.tokenFile != "":
		b, err := os.ReadFile(o.tokenFile)
		if err != nil {
			return cfg, fmt.Errorf("--token-file: %w", err)
		}
		cfg.Token = strings.TrimSpace(string(b))
	case o.devDataDir != "":
		keyFile := filepath.Join(o.devDataDir, devTokenKeyFile)
		// devtoken creates a missing key file, which would mint tokens no
		// server accepts; insist on the dev server's.
		if _, err := os.Stat(keyFile); err != nil {
			return cfg, fmt.Errorf("--dev-data-dir: no development token key; start `meshca dev --data-dir %s` first: %w", o.devDataDir, err)
		}
		a, err := newDevAuthority(o.trustDomain, keyFile, slog.New(slog.DiscardHandler))
		if err != nil {
			return cfg, err
		}
		// Valid for the whole run, warm-up included, and then some.
		if cfg.Token, err = a.Mint(devtoken.MintRequest{Namespace: o.namespace, ServiceAccount: o.account,
			TTL: cfg.Duration + 10*time.Minute}); err != nil {
			return cfg, err
		}
		if bundlePath == "" {
			bundlePath = filepath.Join(o.devDataDir, devBundleFile)
		}
	default:
		return cfg, fmt.Errorf("a token is required to load a running server: --token-file or --dev-data-dir (or use --in-process)")
	}
	if bundlePath == "" {
		return cfg, fmt.Errorf("--ca-bundle is required with --token-file")
	}
	bundle, err := caclient.LoadBundle(bundlePath)
	if err != nil {
		return cfg, fmt.Errorf("--ca-bundle: %w", err)
	}
	cfg.TrustBundle = bundle
	return cfg, nil
}

// inProcessKeys opens the in-process server's keystore. A disk keystore
// without a passphrase file gets a throwaway directory and passphrase.
func (o *benchCSROptions) inProcessKeys(ctx context.Context, cfg *loadgen.Config, log *slog.Logger) error {
	opts := o.keys
	if opts.backend == "disk" && opts.passphraseFile == "" {
		dir, err := os.MkdirTemp("", "meshca-bench-keys-*")
		if err != nil {
			return err
		}
		o.cleanup = func() { _ = os.RemoveAll(dir) }
		opts.dir = filepath.Join(dir, "keys")
		opts.passphraseFile = filepath.Join(dir, "passphrase")
		if err := os.WriteFile(opts.passphraseFile, []byte(rand.Text()), 0o600); err != nil {
			return err
		}
	}
	k, err := opts.open(ctx, "", prometheus.NewRegistry(), log)
	if err != nil {
		return err
	}
	cfg.Keys, cfg.PerReplicaIntermediates, cfg.KeysName = k.keys, k.perReplica, opts.backend
	if k.perReplica {
		cfg.KeysName += " (root; per-replica intermediate in memory)"
	}
	return nil
}
