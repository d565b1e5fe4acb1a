package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/atomicfile"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/certservice"
	"github.com/meshca/meshca/internal/kubestate"
	"github.com/meshca/meshca/internal/leader"
	"github.com/meshca/meshca/internal/peers"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/keystore/disk"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/casource"
)

// caOptions are the flags shared by `server` and `dev` that shape the CA.
type caOptions struct {
	trustDomain     string
	aliases         []string
	caDir           string
	keyType         string
	rootTTL         time.Duration
	intermediateTTL time.Duration
	leafTTL         time.Duration
	maxLeafTTL      time.Duration
	coverage        int
	maintain        time.Duration
}

func (o *caOptions) bind(fs *pflag.FlagSet) {
	fs.StringVar(&o.trustDomain, "trust-domain", "cluster.local", "SPIFFE trust domain of the mesh")
	fs.StringSliceVar(&o.aliases, "trust-domain-aliases", nil, "former or alternative trust domains a CSR may name (the certificate is issued in --trust-domain)")
	fs.StringVar(&o.caDir, "ca-dir", "", "directory with a plugged-in CA in Istio's cacerts layout (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem), reloaded on change; empty: meshca manages its own root")
	fs.StringVar(&o.keyType, "key-type", string(keystore.ECDSAP256), "key type of the self-managed root and intermediates: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096")
	fs.DurationVar(&o.rootTTL, "root-ttl", 365*24*time.Hour, "lifetime of a self-managed root")
	fs.DurationVar(&o.intermediateTTL, "intermediate-ttl", 48*time.Hour, "lifetime of a self-managed intermediate (renewed at half-life)")
	fs.DurationVar(&o.leafTTL, "leaf-ttl", ca.DefaultTTLPolicy.Default, "default workload certificate lifetime")
	fs.DurationVar(&o.maxLeafTTL, "max-leaf-ttl", ca.DefaultTTLPolicy.Max, "longest workload certificate lifetime a caller may ask for (longer requests are shortened)")
	fs.IntVar(&o.coverage, "issuer-coverage", ca.DefaultTTLPolicy.Coverage, "refuse to start unless the signing CA stays valid for this many default leaf lifetimes")
	fs.DurationVar(&o.maintain, "ca-maintain-interval", 10*time.Second, "how often the CA checks whether its intermediate is due for renewal and whether another replica changed the CA journal; failed renewals are retried from 1s, doubling up to 6 times this")
}

// listenOptions are the network flags shared by `server` and `dev`.
type listenOptions struct {
	grpcAddr    string
	monitorAddr string
	dnsNames    []string
	ips         []string
	namespace   string
	account     string
}

func (o *listenOptions) bind(fs *pflag.FlagSet, host string, dnsNames, ips []string) {
	fs.StringVar(&o.grpcAddr, "grpc-addr", net.JoinHostPort(host, "15012"), "address of the CA API (Istio's CreateCertificate over TLS)")
	fs.StringVar(&o.monitorAddr, "monitor-addr", net.JoinHostPort(host, "15014"), "address serving /metrics, /healthz and /readyz")
	fs.StringSliceVar(&o.dnsNames, "serving-dns", dnsNames, "DNS names in the CA API's TLS certificate")
	fs.StringSliceVar(&o.ips, "serving-ip", ips, "IP addresses in the CA API's TLS certificate")
	fs.StringVar(&o.namespace, "namespace", "meshca-system", "namespace meshca runs in (its own SPIFFE ID)")
	fs.StringVar(&o.account, "service-account", "meshca", "service account meshca runs as (its own SPIFFE ID)")
}

// stack is an assembled meshca server.
type stack struct {
	authority *ca.Authority
	server    *server.Server
	registry  *prometheus.Registry
	authn     identity.Authenticator
	secrets   *casource.Source
	sds       *sds.Server
	ledger    *audit.Ledger
	rotator   *rotation.Rotator // nil for a plugged-in CA
	// peers publishes this replica's proxies and certificates to the
	// others and reads theirs for rotation; nil when alone.
	peers *peers.Publisher
	// bundleCM, when set, is where the leader publishes the trust bundle.
	bundleCM  *kubestate.BundleConfigMap
	admin     *admin.Server
	adminOpts adminOptions
	adminLs   []net.Listener // opened by listen
	keysRun   func(ctx context.Context) error
	elector   leader.Elector
	// mtlsStore is the mesh mTLS policy: the admin API edits it, SDS
	// serves it (Current, Changed).
	mtlsStore policy.Store
	auditDir  string
	log       *slog.Logger
}

type stackConfig struct {
	ca          caOptions
	listen      listenOptions
	keys        ca.KeyStore // used when ca.caDir is empty
	journalPath string
	// journal, when set, replaces the file at journalPath.
	journal ca.JournalStore
	// elector chooses the replica that drives root rotation; nil: this
	// process alone.
	elector leader.Elector
	// perReplica gives this process its own in-memory intermediate.
	perReplica bool
	// keysRun, when set, keeps the keystore's credentials fresh.
	keysRun func(ctx context.Context) error
	authn   identity.Authenticator
	// sdsRootsOnly makes the central SDS service serve only the trust
	// bundle, never workload keys.
	sdsRootsOnly bool
	// auditDir holds the audit ledger; auditMirror, when set, receives
	// every record as a JSON line once it is on disk.
	auditDir    string
	auditMirror io.Writer
	// auditCommitDelay spaces the ledger's group commits under load.
	auditCommitDelay time.Duration
	// admin configures the admin API and root rotation.
	admin adminOptions
	// peers shapes the view replicas share for root rotation's gates.
	peers peersOptions
	// mtls says where the mesh mTLS policy is kept.
	mtls mtlsOptions
	// registry holds the metrics; nil makes a new one.
	registry *prometheus.Registry
	log      *slog.Logger
}

// newRegistry returns a metrics registry with the Go runtime's and the
// process's metrics.
func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// runner is an authenticator with informers or watches to run.
type runner interface {
	Run(ctx context.Context) error
}

// readier is an authenticator that is not ready at once.
type readier interface {
	Ready() error
}

func buildStack(ctx context.Context, c stackConfig) (*stack, error) {
	td, err := spiffeid.TrustDomainFromString(c.ca.trustDomain)
	if err != nil {
		return nil, fmt.Errorf("--trust-domain: %w", err)
	}
	var aliases []spiffeid.TrustDomain
	for _, s := range c.ca.aliases {
		alias, err := spiffeid.TrustDomainFromString(s)
		if err != nil {
			return nil, fmt.Errorf("--trust-domain-aliases: %w", err)
		}
		aliases = append(aliases, alias)
	}
	reg := c.registry
	if reg == nil {
		reg = newRegistry()
	}

	var src ca.Source
	if c.ca.caDir != "" {
		src, err = ca.NewPluggedIn(ca.PluggedInConfig{Dir: c.ca.caDir, Logger: c.log})
	} else {
		var kt keystore.KeyType
		if kt, err = keystore.ParseKeyType(c.ca.keyType); err != nil {
			return nil, fmt.Errorf("--key-type: %w", err)
		}
		src, err = ca.NewSelfManaged(ca.SelfManagedConfig{
			TrustDomain: td, Keys: c.keys, JournalPath: c.journalPath, Journal: c.journal, KeyType: kt, PerReplicaIntermediates: c.perReplica,
			RootTTL: c.ca.rootTTL, IntermediateTTL: c.ca.intermediateTTL, Logger: c.log,
		})
	}
	if err != nil {
		return nil, err
	}
	authority, err := ca.New(ca.Config{
		TrustDomain:        td,
		TrustDomainAliases: aliases,
		Source:             src,
		TTL:                ca.TTLPolicy{Default: c.ca.leafTTL, Max: c.ca.maxLeafTTL, Coverage: c.ca.coverage},
		MaintainInterval:   c.ca.maintain,
		RetryMin:           min(time.Second, c.ca.maintain),
		RetryMax:           6 * c.ca.maintain,
		Logger:             c.log,
		Metrics:            reg,
	})
	if err != nil {
		return nil, err
	}
	if err := authority.Init(ctx); err != nil {
		return nil, err
	}
	ledger, err := audit.New(audit.Config{Dir: c.auditDir, Signer: checkpointSigner{authority}, Mirror: c.auditMirror,
		CommitDelay: c.auditCommitDelay, Logger: c.log, Metrics: reg})
	if err != nil {
		return nil, err
	}
	mtlsStore, err := buildMTLSStore(ctx, c, reg)
	if err != nil {
		return nil, err
	}
	svc, err := certservice.New(certservice.Config{Authenticator: c.authn, Issuer: authority, Ledger: ledger, Logger: c.log, Metrics: reg})
	if err != nil {
		return nil, err
	}
	secrets, err := casource.New(casource.Config{Authority: authority, TTL: c.ca.leafTTL, RootsOnly: c.sdsRootsOnly, Ledger: ledger,
		Policy: mtlsStore, Logger: c.log})
	if err != nil {
		return nil, err
	}
	sdsSrv, err := sds.New(sds.Config{Source: secrets, Authenticate: sds.BearerAuthenticator(c.authn), Logger: c.log, Metrics: reg})
	if err != nil {
		return nil, err
	}
	serverID, err := identity.WorkloadID(td, c.listen.namespace, c.listen.account)
	if err != nil {
		return nil, err
	}
	var ips []net.IP
	for _, s := range c.listen.ips {
		ip := net.ParseIP(strings.TrimSpace(s))
		if ip == nil {
			return nil, fmt.Errorf("--serving-ip: %q is not an IP address", s)
		}
		ips = append(ips, ip)
	}
	ready := map[string]server.Check{"ca": caReadiness(authority)}
	if r, ok := c.authn.(readier); ok {
		ready["identity"] = r.Ready
	}
	ready["mtls-policy"] = mtlsReadiness(mtlsStore)
	srv, err := server.New(server.Config{
		GRPCAddr:       c.listen.grpcAddr,
		MonitorAddr:    c.listen.monitorAddr,
		CA:             authority,
		ServerID:       serverID,
		DNSNames:       c.listen.dnsNames,
		IPs:            ips,
		Services:       []server.Service{svc, sdsSrv},
		MaxRecvMsgSize: certservice.MaxRequestBytes,
		Ready:          ready,
		Gatherer:       reg,
		Logger:         c.log,
	})
	if err != nil {
		return nil, err
	}
	st := &stack{authority: authority, server: srv, registry: reg, authn: c.authn, secrets: secrets, sds: sdsSrv,
		ledger: ledger, adminOpts: c.admin, keysRun: c.keysRun, elector: c.elector, mtlsStore: mtlsStore, auditDir: c.auditDir, log: c.log}
	if err := st.buildAdmin(c); err != nil {
		return nil, err
	}
	return st, nil
}

// buildAdmin makes the root rotation driver and the admin API.
func (s *stack) buildAdmin(c stackConfig) error {
	var routes []admin.Route
	if c.ca.caDir == "" {
		// With replicas, the gates must count every replica's proxies and
		// certificates, not only this one's.
		var proxies rotation.Proxies = s.sds
		var ledger rotation.Ledger = ledgerHoldings(s.ledger)
		pub, err := buildPeers(c, proxies, ledger, s.registry)
		if err != nil {
			return err
		}
		if pub != nil {
			s.peers = pub
			proxies, ledger = pub.View(), pub.View()
		}
		rot, err := rotation.New(rotation.Config{
			CA: s.authority, Proxies: proxies, Ledger: ledger,
			MinAcked: c.admin.minAcked, Schedule: c.admin.schedule, Leader: c.elector, Logger: c.log, Metrics: s.registry,
		})
		if err != nil {
			return err
		}
		s.rotator = rot
		routes = append(routes, admin.RootRoutes(rot)...)
	}
	mtlsRoutes, err := s.mtlsRoutes(c)
	if err != nil {
		return err
	}
	routes = append(routes, mtlsRoutes...)
	cfg := admin.Config{Routes: routes, Local: admin.LocalAuthorizer{}, Ledger: s.ledger, Logger: c.log}
	if c.admin.addr != "" {
		k, ok := c.authn.(*kubeAuth)
		if !ok {
			return fmt.Errorf("--admin-addr authorises callers with Kubernetes; it needs --authenticator=kube")
		}
		cfg.Remote = admin.KubeAuthorizer{Client: k.client, Namespace: c.listen.namespace}
	}
	a, err := admin.New(cfg)
	if err != nil {
		return err
	}
	s.admin = a
	return nil
}

// run serves until ctx ends. bundlePath, when set, receives the trust
// bundle now and after every change.
func (s *stack) run(ctx context.Context, bundlePath string) error {
	if err := s.listen(); err != nil {
		return err
	}
	// The bundle exists before the server says it serves, as in dev.
	if bundlePath != "" {
		if err := writeBundleOnce(s.authority, bundlePath); err != nil {
			return err
		}
	}
	return s.serve(ctx, bundlePath)
}

// listen opens every listener (the server's and the admin API's), so that
// whatever announces the server afterwards can be acted on at once.
func (s *stack) listen() error {
	if err := s.server.Listen(); err != nil {
		return err
	}
	var err error
	s.adminLs, err = s.adminListeners(s.adminOpts)
	return err
}

// serve serves on the listeners listen opened until ctx ends.
func (s *stack) serve(ctx context.Context, bundlePath string) error {
	g, ctx := errgroup.WithContext(ctx)
	for _, l := range s.adminLs {
		g.Go(func() error { return s.admin.Serve(ctx, l) })
	}
	if s.rotator != nil {
		g.Go(func() error { return s.rotator.Run(ctx) })
	}
	if s.peers != nil {
		g.Go(func() error { return s.peers.Run(ctx) })
	}
	g.Go(func() error { return s.authority.Run(ctx) })
	if s.elector != nil {
		g.Go(func() error { return s.elector.Run(ctx) })
	}
	if s.keysRun != nil {
		g.Go(func() error {
			// Losing the keystore's credentials stops renewals, not
			// issuance: the CA's readiness reports it, and serving goes on.
			if err := s.keysRun(ctx); err != nil {
				s.log.Error("the keystore's credentials can no longer be renewed; CA renewals will fail", "err", err)
			}
			return nil
		})
	}
	g.Go(func() error { return s.server.Serve(ctx) })
	g.Go(func() error { return s.secrets.Run(ctx) })
	g.Go(func() error { return s.ledger.Run(ctx) })
	g.Go(func() error { return s.mtlsStore.Run(ctx) })
	g.Go(func() error {
		return keepRootHistory(ctx, s.authority, filepath.Join(s.auditDir, auditRootsFile), s.log)
	})
	defer s.ledger.Close()
	if r, ok := s.authn.(runner); ok {
		g.Go(func() error { return r.Run(ctx) })
	}
	if bundlePath != "" {
		g.Go(func() error { return writeBundle(ctx, s.authority, bundlePath, s.log) })
	}
	if s.bundleCM != nil {
		g.Go(func() error { return publishBundle(ctx, s.authority, s.elector, s.bundleCM, s.log) })
	}
	return g.Wait()
}

// caReadiness is the CA's /readyz check: not ready before it can sign or
// once its signing certificate has expired; degraded (still ready) while
// renewal keeps failing, with when it started and how long signing can go
// on.
func caReadiness(a *ca.Authority) server.Check {
	return func() error {
		iss := a.Issuer()
		if iss == nil {
			return ca.ErrNotReady
		}
		if f := a.Failing(); f != nil {
			err := fmt.Errorf("renewing the signing intermediate has failed %d times since %s (next try %s); still signing with the current one until %s: %w",
				f.Attempts, f.Since.UTC().Format(time.RFC3339), f.NextRetry.UTC().Format(time.RFC3339), iss.Cert.NotAfter.UTC().Format(time.RFC3339), f.Err)
			if !time.Now().Before(iss.Cert.NotAfter) {
				return err
			}
			return server.Degraded(err)
		}
		return nil
	}
}

// writeBundle keeps bundlePath equal to the CA's trust bundle.
func writeBundle(ctx context.Context, a *ca.Authority, path string, log *slog.Logger) error {
	for {
		changed := a.Changed()
		if err := writeBundleOnce(a, path); err != nil {
			return err
		}
		log.Debug("wrote trust bundle", "path", path)
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

// auditRootsFile, in the audit directory, holds every root that has been
// in the trust bundle: checkpoints signed before a root rotation still
// verify against it after the old root has left the bundle.
const auditRootsFile = "roots.pem"

// keepRootHistory adds each new root of the CA's bundle to path, never
// removing one.
func keepRootHistory(ctx context.Context, a *ca.Authority, path string, log *slog.Logger) error {
	for {
		changed := a.Changed()
		var known []*x509.Certificate
		if data, err := os.ReadFile(path); err == nil {
			if known, err = ca.ParseCerts(data); err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		all := known
		for _, r := range a.Issuer().Roots {
			if !slices.ContainsFunc(all, r.Equal) {
				all = append(all, r)
			}
		}
		if len(all) > len(known) {
			if err := atomicfile.Write(path, ca.EncodeCerts(all...), 0o644); err != nil {
				return fmt.Errorf("recording the roots that sign audit checkpoints: %w", err)
			}
			log.Debug("recorded a new root for audit verification", "path", path, "roots", len(all))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

func writeBundleOnce(a *ca.Authority, path string) error {
	if err := atomicfile.Write(path, ca.EncodeCerts(a.Issuer().Roots...), 0o644); err != nil {
		return fmt.Errorf("writing trust bundle: %w", err)
	}
	return nil
}

// openDiskKeystore opens the disk keystore's format, in cfg.Dir or
// cfg.Files, with a passphrase read from a file (never from a flag: flags
// show up in process listings).
func openDiskKeystore(cfg disk.Config, passphraseFile, backend string) (*disk.Store, error) {
	if passphraseFile == "" {
		return nil, fmt.Errorf("--keystore-passphrase-file is required for the %s keystore", backend)
	}
	pass, err := os.ReadFile(passphraseFile)
	if err != nil {
		return nil, fmt.Errorf("keystore passphrase: %w", err)
	}
	defer clear(pass)
	cfg.Passphrase = bytes.TrimRight(pass, "\r\n")
	return disk.New(cfg)
}

// checkpointSigner signs the audit ledger's checkpoints with the CA's
// current signing key; the digest is domain-separated, so the signature can
// never pass for a certificate's.
type checkpointSigner struct{ a *ca.Authority }

func (s checkpointSigner) SignCheckpoint(_ context.Context, digest []byte) ([]byte, []*x509.Certificate, error) {
	iss := s.a.Issuer()
	if iss == nil {
		return nil, nil, ca.ErrNotReady
	}
	sig, err := iss.Signer.Sign(rand.Reader, digest, crypto.SHA256)
	if err != nil {
		return nil, nil, fmt.Errorf("signing an audit checkpoint: %w", err)
	}
	return sig, iss.Chain, nil
}
