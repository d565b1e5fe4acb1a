package main

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/devtoken"
)

// Files of the development data directory.
const (
	devPassphraseFile = "keystore-passphrase"
	devTokenKeyFile   = "dev-token-key.pem"
	devBundleFile     = "root-cert.pem"
	devJournalFile    = "ca-journal.json"
	devKeysDir        = "keys"
	devAuditDir       = "audit"
)

type devOptions struct {
	ca      caOptions
	listen  listenOptions
	kube    kubeOptions
	dataDir string
}

func newDevCommand(g *globalOptions) *cobra.Command {
	o := &devOptions{}
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run meshca locally for development: CA server, local keystore and a development token issuer",
		Long: `Run meshca locally for development. Everything lives in --data-dir: an
encrypted keystore (with a generated passphrase), the CA journal, the trust
bundle (root-cert.pem) and the key of a development token issuer whose tokens
look like Kubernetes service-account tokens. Not for production.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if err := os.MkdirAll(o.dataDir, 0o700); err != nil {
				return err
			}
			passFile, err := ensureDevPassphrase(filepath.Join(o.dataDir, devPassphraseFile))
			if err != nil {
				return err
			}
			keys, err := openDiskKeystore(filepath.Join(o.dataDir, devKeysDir), passFile, log)
			if err != nil {
				return err
			}
			reg := newRegistry()
			var authn identity.Authenticator
			if o.kube.kubeconfig != "" {
				authn, err = o.kube.build(ctx, o.ca.trustDomain, o.listen.namespace, reg, log)
			} else {
				authn, err = newDevAuthority(o.ca.trustDomain, filepath.Join(o.dataDir, devTokenKeyFile), log)
			}
			if err != nil {
				return err
			}
			st, err := buildStack(ctx, stackConfig{ca: o.ca, listen: o.listen, keys: keys,
				journalPath: filepath.Join(o.dataDir, devJournalFile), authn: authn, registry: reg,
				auditDir: filepath.Join(o.dataDir, devAuditDir), log: log})
			if err != nil {
				return err
			}
			if err := st.server.Listen(); err != nil {
				return err
			}
			// The banner tells people to use the bundle file: it must exist
			// before the banner does.
			if err := writeBundleOnce(st.authority, filepath.Join(o.dataDir, devBundleFile)); err != nil {
				return err
			}
			printDevBanner(cmd.OutOrStdout(), o, st)
			return st.serve(ctx, filepath.Join(o.dataDir, devBundleFile))
		},
	}
	fs := cmd.Flags()
	o.ca.bind(fs)
	o.listen.bind(fs, "127.0.0.1", []string{"localhost"}, []string{"127.0.0.1", "::1"})
	fs.StringVar(&o.dataDir, "data-dir", ".meshca-dev", "directory for all development state")
	o.kube.bind(fs, "authenticate workloads with TokenReview in this cluster instead of the development token issuer", false)
	cmd.AddCommand(newDevTokenCommand())
	return cmd
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

func printDevBanner(w io.Writer, o *devOptions, st *stack) {
	self := os.Args[0]
	if !strings.Contains(self, "/") {
		self = "meshca"
	}
	bundle := filepath.Join(o.dataDir, devBundleFile)
	root := st.authority.Issuer().Roots[0]
	tokens := "tokens come from a local development\nissuer, and the keystore passphrase sits next to the keys"
	mint := fmt.Sprintf("%s dev token --data-dir %s --namespace default --service-account web > web.token", self, o.dataDir)
	if o.kube.kubeconfig != "" {
		tokens = "tokens are reviewed by the cluster of\n" + o.kube.kubeconfig + ", and the keystore passphrase sits next to the keys"
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

Stop with Ctrl-C; state is kept in %s.

`, tokens, st.authority.TrustDomain(), st.server.GRPCAddr(), st.server.MonitorAddr(),
		bundle, ca.Fingerprint(root)[:16], root.NotAfter.Format(time.RFC3339),
		mint, self, st.server.GRPCAddr(), bundle, o.dataDir)
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
