package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/devtoken"
	"github.com/meshca/meshca/internal/agent"
	"github.com/meshca/meshca/internal/atomicfile"
	"github.com/meshca/meshca/keystore/disk"
)

// Files of the development data directory.
const (
	devPassphraseFile = "keystore-passphrase"
	devTokenKeyFile   = "dev-token-key.pem"
	devBundleFile     = "root-cert.pem"
	devJournalFile    = "ca-journal.json"
	devKeysDir        = "keys"
	devAuditDir       = "audit"
	devSDSDir         = "sds"
	devSDSSocket      = "agent.sock"
	devSDSToken       = "token"
)

type devOptions struct {
	ca      caOptions
	listen  listenOptions
	kube    kubeOptions
	admin   adminOptions
	mtls    mtlsOptions
	dataDir string
	// keystore is disk (in the data directory) or vault.
	keystore string
	vault    vaultOptions
	sds      devSDSOptions
}

// devSDSOptions configure the node agent dev runs in process.
type devSDSOptions struct {
	socket    string
	socketSet bool // --sds-socket was given, so "" means off
	namespace string
	account   string
	tokenFile string
}

func newDevCommand(g *globalOptions) *cobra.Command {
	o := &devOptions{}
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run meshca locally for development: CA server, local keystore and a development token issuer",
		Long: `Run meshca locally for development. Everything lives in --data-dir: an
encrypted keystore (with a generated passphrase), the CA journal, the trust
bundle (root-cert.pem) and the key of a development token issuer whose tokens
look like Kubernetes service-account tokens. Not for production.

It also runs a node agent in process, as "meshca agent" runs next to a proxy:
it requests a certificate for one workload (--sds-namespace,
--sds-service-account) from this server and serves it, with the trust bundle,
to Envoy over SDS on a Unix socket (--sds-socket). Its token is a development
token dev mints into <data-dir>/sds/token and renews; with --kubeconfig, give
one with --sds-token-file.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			o.sds.socketSet = cmd.Flags().Changed("sds-socket")
			if err := os.MkdirAll(o.dataDir, 0o700); err != nil {
				return err
			}
			reg := newRegistry()
			keys, err := o.openKeystore(ctx, reg, log)
			if err != nil {
				return err
			}
			var (
				authn  identity.Authenticator
				tokens *devtoken.Authority
			)
			if o.kube.kubeconfig != "" {
				authn, err = o.kube.build(ctx, o.ca.trustDomain, o.listen.namespace, reg, log)
			} else {
				tokens, err = newDevAuthority(o.ca.trustDomain, filepath.Join(o.dataDir, devTokenKeyFile), log)
				authn = tokens
			}
			if err != nil {
				return err
			}
			plan, err := o.planAgent(tokens)
			if err != nil {
				return err
			}
			if o.admin.socket == "" {
				o.admin.socket = filepath.Join(o.dataDir, "admin", "admin.sock")
			}
			// Two dev servers on one data directory take turns at rotation.
			elector, err := fileElector(o.dataDir, reg, log)
			if err != nil {
				return err
			}
			st, err := buildStack(ctx, stackConfig{ca: o.ca, listen: o.listen, keys: keys.keys, elector: elector,
				perReplica: keys.perReplica, keysRun: keys.run, journalPath: filepath.Join(o.dataDir, devJournalFile), authn: authn, registry: reg,
				auditDir: filepath.Join(o.dataDir, devAuditDir), admin: o.admin, log: log,
				mtls: o.mtls.inDataDir(o.dataDir)})
			if err != nil {
				return err
			}
			if err := st.listen(); err != nil {
				return err
			}
			// The banner tells people to use the bundle file: it must exist
			// before the banner does.
			if err := writeBundleOnce(st.authority, filepath.Join(o.dataDir, devBundleFile)); err != nil {
				return err
			}
			// The agent's token, like the bundle, exists before the banner.
			ag, err := plan.build(st, log)
			if err != nil {
				return err
			}
			printDevBanner(cmd.OutOrStdout(), o, st, plan)
			return serveDev(ctx, st, filepath.Join(o.dataDir, devBundleFile), ag, plan.minter)
		},
	}
	fs := cmd.Flags()
	o.ca.bind(fs)
	o.listen.bind(fs, "127.0.0.1", []string{"localhost"}, []string{"127.0.0.1", "::1"})
	fs.StringVar(&o.dataDir, "data-dir", ".meshca-dev", "directory for all development state")
	o.kube.bind(fs, "authenticate workloads with TokenReview in this cluster instead of the development token issuer", false)
	o.admin.bind(fs, false)
	o.mtls.bind(fs, false)
	fs.StringVar(&o.keystore, "keystore", "disk", "where the CA's keys live: disk (encrypted in <data-dir>/keys, with a generated passphrase) or vault (HashiCorp Vault Transit; see the --vault-* flags)")
	o.vault.bind(fs)
	fs.StringVar(&o.sds.socket, "sds-socket", "", `Unix socket on which the in-process node agent serves SDS to Envoy (default <data-dir>/sds/agent.sock; "" runs no agent)`)
	fs.StringVar(&o.sds.namespace, "sds-namespace", "default", "namespace of the agent's workload")
	fs.StringVar(&o.sds.account, "sds-service-account", "default", "service account of the agent's workload")
	fs.StringVar(&o.sds.tokenFile, "sds-token-file", "", "token the agent presents, re-read for every request (default: a development token minted into <data-dir>/sds/token and renewed; required with --kubeconfig)")
	cmd.AddCommand(newDevTokenCommand())
	return cmd
}

// openKeystore opens dev's keystore: the disk one in the data directory,
// or Vault as meshca server would use it.
func (o *devOptions) openKeystore(ctx context.Context, reg prometheus.Registerer, log *slog.Logger) (openedKeystore, error) {
	switch o.keystore {
	case "disk":
		passFile, err := ensureDevPassphrase(filepath.Join(o.dataDir, devPassphraseFile))
		if err != nil {
			return openedKeystore{}, err
		}
		keys, err := openDiskKeystore(disk.Config{Dir: filepath.Join(o.dataDir, devKeysDir), Logger: log}, passFile, "disk")
		return openedKeystore{keys: keys}, err
	case "vault":
		return o.vault.openKeystore(ctx, reg, log)
	default:
		return openedKeystore{}, fmt.Errorf("--keystore must be disk or vault, not %q", o.keystore)
	}
}

// ensureDevPassphrase creates a random keystore passphrase on first use. A
// passphrase stored next to the keys protects nothing; it exists so dev mode
// exercises the same encrypted keystore as production.
func ensureDevPassphrase(path string) (string, error) {
	_, err := os.Stat(path)
	if err == nil {
		return path, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	if err := os.WriteFile(path, []byte(base64.RawStdEncoding.EncodeToString(b[:])+"\n"), 0o600); err != nil {
		return "", err
	}
	return path, nil
}

func printDevBanner(w io.Writer, o *devOptions, st *stack, plan *devAgentPlan) {
	self := os.Args[0]
	if !strings.Contains(self, "/") {
		self = "meshca"
	}
	bundle := filepath.Join(o.dataDir, devBundleFile)
	root := st.authority.Issuer().Roots[0]
	keys := ", and the keystore passphrase sits next to the keys"
	if o.keystore == "vault" {
		keys = ";\nthe root key is in Vault at " + o.vault.addr
	}
	tokens := "tokens come from a local development\nissuer" + keys
	mint := fmt.Sprintf("%s dev token --data-dir %s --namespace default --service-account web > web.token", self, o.dataDir)
	if o.kube.kubeconfig != "" {
		tokens = "tokens are reviewed by the cluster of\n" + o.kube.kubeconfig + keys
		mint = fmt.Sprintf("kubectl --kubeconfig %s -n default create token web --audience %s > web.token",
			o.kube.kubeconfig, strings.Join(o.kube.audiences, ","))
	}
	fmt.Fprintf(w, `
meshca dev is running. DEVELOPMENT MODE: %s. Not for production.

  trust domain   %s
  CA API         %s   (istio.v1.auth.IstioCertificateService/CreateCertificate, TLS)
  monitoring     http://%s/metrics  /healthz  /readyz
  trust bundle   %s  (root %s…, valid until %s)

Get a certificate for service account "web" in namespace "default":

  %s
  %s cert --addr %s --ca-bundle %s --token-file web.token --out web-certs

and look at it:

  openssl x509 -in web-certs/cert-chain.pem -noout -subject -ext subjectAltName -enddate

%s
Stop with Ctrl-C; state is kept in %s.

`, tokens, st.authority.TrustDomain(), st.server.GRPCAddr(), st.server.MonitorAddr(),
		bundle, ca.Fingerprint(root)[:16], root.NotAfter.Format(time.RFC3339),
		mint, self, st.server.GRPCAddr(), bundle, plan.banner(self), o.dataDir)
}

func newDevTokenCommand() *cobra.Command {
	var (
		dataDir, trustDomain string
		req                  devtoken.MintRequest
	)
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Mint a development service-account token accepted by `meshca dev`",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			keyFile := filepath.Join(dataDir, devTokenKeyFile)
			if _, err := os.Stat(keyFile); err != nil {
				return fmt.Errorf("no development token key in %s; start `meshca dev --data-dir %s` first: %w", dataDir, dataDir, err)
			}
			a, err := newDevAuthority(trustDomain, keyFile, slog.New(slog.DiscardHandler))
			if err != nil {
				return err
			}
			tok, err := a.Mint(req)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), tok)
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&dataDir, "data-dir", ".meshca-dev", "the data directory of `meshca dev`")
	fs.StringVar(&trustDomain, "trust-domain", "cluster.local", "trust domain of the dev server")
	fs.StringVarP(&req.Namespace, "namespace", "n", "default", "namespace of the workload")
	fs.StringVarP(&req.ServiceAccount, "service-account", "s", "default", "service account of the workload")
	fs.StringSliceVar(&req.Audiences, "audience", nil, "token audiences (default: meshca)")
	fs.DurationVar(&req.TTL, "ttl", time.Hour, "token lifetime")
	fs.StringVar(&req.PodName, "pod", "", "pod name to bind the token to")
	fs.StringVar(&req.PodUID, "pod-uid", "", "pod UID to bind the token to")
	fs.StringVar(&req.NodeName, "node", "", "node name to record in the token")
	return cmd
}

// devAgentPlan is what dev decided about its node agent.
type devAgentPlan struct {
	off       string // why no agent runs; empty when one does
	socket    string
	tokenFile string
	id        spiffeid.ID  // the identity asked for; zero when the token is the user's
	minter    *tokenMinter // nil when the token is the user's
}

// planAgent decides from the flags whether and how the agent runs. tokens
// is nil when workloads are authenticated with TokenReview.
func (o *devOptions) planAgent(tokens *devtoken.Authority) (*devAgentPlan, error) {
	socket := o.sds.socket
	if !o.sds.socketSet {
		socket = filepath.Join(o.dataDir, devSDSDir, devSDSSocket)
	}
	if socket == "" {
		return &devAgentPlan{off: `off (--sds-socket "")`}, nil
	}
	p := &devAgentPlan{}
	var err error
	// Absolute, so the banner's instructions work from any directory.
	if p.socket, err = filepath.Abs(socket); err != nil {
		return nil, fmt.Errorf("--sds-socket: %w", err)
	}
	switch {
	case o.sds.tokenFile != "":
		if p.tokenFile, err = filepath.Abs(o.sds.tokenFile); err != nil {
			return nil, fmt.Errorf("--sds-token-file: %w", err)
		}
	case tokens == nil:
		if o.sds.socketSet {
			return nil, fmt.Errorf("--sds-socket with --kubeconfig needs --sds-token-file: dev cannot mint tokens the cluster accepts")
		}
		return &devAgentPlan{off: "off: with --kubeconfig, dev cannot mint its token; give one with --sds-token-file"}, nil
	default:
		td, err := spiffeid.TrustDomainFromString(o.ca.trustDomain)
		if err != nil {
			return nil, fmt.Errorf("--trust-domain: %w", err)
		}
		if p.id, err = identity.WorkloadID(td, o.sds.namespace, o.sds.account); err != nil {
			return nil, fmt.Errorf("--sds-namespace, --sds-service-account: %w", err)
		}
		if p.tokenFile, err = filepath.Abs(filepath.Join(o.dataDir, devSDSDir, devSDSToken)); err != nil {
			return nil, err
		}
		p.minter = &tokenMinter{tokens: tokens, path: p.tokenFile, clock: clockwork.NewRealClock(),
			req: devtoken.MintRequest{Namespace: o.sds.namespace, ServiceAccount: o.sds.account, TTL: devtoken.DefaultTTL}}
	}
	return p, nil
}

// build writes the agent's first token and configures the agent against
// the stack's server, which must be listening. It returns nil when no agent
// runs.
func (p *devAgentPlan) build(st *stack, log *slog.Logger) (*agent.Agent, error) {
	if p.off != "" {
		return nil, nil
	}
	if p.minter != nil {
		if err := os.MkdirAll(filepath.Dir(p.tokenFile), 0o700); err != nil {
			return nil, fmt.Errorf("dev: %w", err)
		}
		p.minter.log = log
		if err := p.minter.mint(); err != nil {
			return nil, err
		}
	}
	a, err := agent.New(agent.Config{
		ServerAddr:  dialable(st.server.GRPCAddr()),
		TrustBundle: st.authority.Issuer().Roots,
		TokenFile:   p.tokenFile,
		SocketPath:  p.socket,
		Logger:      log.With("component", "agent"),
	})
	if err != nil {
		return nil, fmt.Errorf("dev: %w", err)
	}
	return a, nil
}

// dialable turns a listening address into one to dial: an unspecified host
// (":15012", "0.0.0.0:15012") becomes 127.0.0.1, which the serving
// certificate names by default.
func dialable(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		return net.JoinHostPort("127.0.0.1", port)
	}
	return addr
}

// banner tells how to reach the agent.
func (p *devAgentPlan) banner(self string) string {
	if p.off != "" {
		return "Node agent (SDS for Envoy): " + p.off + ".\n"
	}
	id := "the one " + p.tokenFile + " proves\n  agent token    " + p.tokenFile + "  (--sds-token-file, read for every request)"
	if p.minter != nil {
		id = fmt.Sprintf("%s\n  agent token    %s  (development token, minted again every %d minutes)",
			p.id, p.tokenFile, int((p.minter.req.TTL / 2).Minutes()))
	}
	return fmt.Sprintf(`Envoy gets its certificate ("default") and trust bundle ("ROOTCA") over SDS
from a node agent in this process, as from "meshca agent" next to a proxy:

  SDS socket     %[1]s
  identity       %[2]s

Watch what it serves, as Envoy would (--once: stop after the first complete set):

  %[3]s sds watch --socket %[1]s --once

Point Envoy at it: in its bootstrap, a cluster for the socket

  static_resources:
    clusters:
    - name: sds-grpc
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
      load_assignment:
        cluster_name: sds-grpc
        endpoints:
        - lb_endpoints:
          - endpoint:
              address:
                pipe:
                  path: %[1]s

and in the common_tls_context of each TLS transport socket

  common_tls_context:
    tls_certificate_sds_secret_configs:
    - name: default
      sds_config:
        resource_api_version: V3
        api_config_source:
          api_type: GRPC
          transport_api_version: V3
          grpc_services:
          - envoy_grpc: {cluster_name: sds-grpc}
    validation_context_sds_secret_config:
      name: ROOTCA
      sds_config:
        resource_api_version: V3
        api_config_source:
          api_type: GRPC
          transport_api_version: V3
          grpc_services:
          - envoy_grpc: {cluster_name: sds-grpc}
`, p.socket, id, self)
}

// tokenMinter keeps a development token for the agent in a file, minting a
// new one at half the lifetime of the last; the agent reads the file for
// every request.
type tokenMinter struct {
	tokens *devtoken.Authority
	req    devtoken.MintRequest
	path   string
	clock  clockwork.Clock
	log    *slog.Logger
}

func (m *tokenMinter) mint() error {
	tok, err := m.tokens.Mint(m.req)
	if err != nil {
		return fmt.Errorf("dev: mint the agent's token: %w", err)
	}
	if err := atomicfile.Write(m.path, []byte(tok+"\n"), 0o600); err != nil {
		return fmt.Errorf("dev: write the agent's token: %w", err)
	}
	return nil
}

// tokenRetry is how soon a failed renewal is retried: a token renewed at
// half its lifetime has plenty of attempts left.
const tokenRetry = time.Minute

// run renews the token until ctx ends.
func (m *tokenMinter) run(ctx context.Context) error {
	next := m.req.TTL / 2
	for {
		t := m.clock.NewTimer(next)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.Chan():
		}
		next = m.req.TTL / 2
		if err := m.mint(); err != nil {
			m.log.Error("cannot renew the agent's token", "err", err, "retryIn", tokenRetry)
			next = tokenRetry
		}
	}
}

// serveDev serves the stack and the agent (if any) until ctx ends or one of
// them fails. The agent stops first, so the server's graceful stop finds
// the agent's stream already closed.
func serveDev(ctx context.Context, st *stack, bundlePath string, a *agent.Agent, minter *tokenMinter) error {
	if a == nil {
		return st.serve(ctx, bundlePath)
	}
	stackCtx, stopStack := context.WithCancel(context.WithoutCancel(ctx))
	defer stopStack()
	agentCtx, stopAgent := context.WithCancel(ctx)
	defer stopAgent()
	stackDone := make(chan error, 1)
	go func() {
		stackDone <- st.serve(stackCtx, bundlePath)
		stopAgent()
	}()
	g, gctx := errgroup.WithContext(agentCtx)
	g.Go(func() error { return a.Run(gctx) })
	if minter != nil {
		g.Go(func() error { return minter.run(gctx) })
	}
	agentErr := g.Wait()
	stopStack()
	return errors.Join(agentErr, <-stackDone)
}
