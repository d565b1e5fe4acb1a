package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/kube"
	"github.com/meshca/meshca/identity/multicluster"
)

// startupCheckTimeout bounds the permission checks made at start-up.
const startupCheckTimeout = 30 * time.Second

// kubeOptions are the flags of Kubernetes token authentication.
type kubeOptions struct {
	kubeconfig      string
	clusterID       string
	audiences       []string
	cacheTTL        time.Duration
	cacheSize       int
	qps             float32
	burst           int
	requirePodBound bool
	noBinding       bool
	remotes         []string
	remoteSecrets   bool
	secretSelector  string
}

func (o *kubeOptions) bind(fs *pflag.FlagSet, kubeconfigHelp string, remoteSecrets bool) {
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", kubeconfigHelp)
	fs.StringVar(&o.clusterID, "cluster-id", "Kubernetes", "ID of the local cluster, as workloads' agents send it (Istio's default is Kubernetes); credentials naming no cluster go to it")
	fs.StringSliceVar(&o.audiences, "token-audiences", []string{"meshca"}, "audiences a workload token must be bound to (sent to TokenReview and checked in its answer)")
	fs.DurationVar(&o.cacheTTL, "token-cache-ttl", 5*time.Minute, "longest time a successful TokenReview is reused (never past the token's own expiry); 0 reviews every request")
	fs.IntVar(&o.cacheSize, "token-cache-size", 10000, "most reviewed tokens kept per cluster")
	fs.Float32Var(&o.qps, "kube-qps", kube.DefaultQPS, "queries per second to each Kubernetes API server")
	fs.IntVar(&o.burst, "kube-burst", kube.DefaultBurst, "burst of queries to each Kubernetes API server")
	fs.BoolVar(&o.requirePodBound, "require-pod-bound", false, "refuse tokens that are not bound to a pod")
	fs.BoolVar(&o.noBinding, "no-binding-checks", false, "do not watch pods and service accounts (a deleted pod's cached token then works until its cache entry ends); needs fewer permissions")
	fs.StringArrayVar(&o.remotes, "remote-kubeconfig", nil, "a remote cluster as ID=PATH to its kubeconfig (repeatable)")
	fs.BoolVar(&o.remoteSecrets, "remote-secrets", remoteSecrets, "add remote clusters from Secrets in --namespace labelled with --remote-secret-selector (each data key a cluster ID, its value a kubeconfig)")
	fs.StringVar(&o.secretSelector, "remote-secret-selector", multicluster.DefaultSecretSelector, "label selector of remote-cluster Secrets")
}

// kubeAuth authenticates workload tokens with TokenReview in the local
// cluster and any remote ones.
type kubeAuth struct {
	// client is the local cluster's, for the admin API's access reviews.
	client  kubernetes.Interface
	router  *multicluster.Router
	local   *kube.Cluster
	watcher *multicluster.SecretWatcher // nil without --remote-secrets
}

var _ identity.Authenticator = (*kubeAuth)(nil)

func (k *kubeAuth) Authenticate(ctx context.Context, cred identity.Credential) (identity.Caller, error) {
	return k.router.Authenticate(ctx, cred)
}

func (k *kubeAuth) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return k.router.Run(ctx) })
	if k.watcher != nil {
		g.Go(func() error { return k.watcher.Run(ctx) })
	}
	return g.Wait()
}

// Ready reports whether the local cluster's informers have synced.
func (k *kubeAuth) Ready() error { return k.local.Ready() }

// restConfig loads --kubeconfig, or the in-cluster configuration without it.
func (o *kubeOptions) restConfig() (*rest.Config, error) {
	if o.kubeconfig != "" {
		rc, err := clientcmd.BuildConfigFromFlags("", o.kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("--kubeconfig: %w", err)
		}
		return rc, nil
	}
	rc, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("not running in a Kubernetes cluster and no --kubeconfig given (%w); "+
			"to try meshca without a cluster, run `meshca dev`", err)
	}
	return rc, nil
}

// build makes the authenticator and checks, before anything is served, that
// meshca holds every permission it needs in every cluster it was given.
func (o *kubeOptions) build(ctx context.Context, trustDomain, namespace string, reg prometheus.Registerer, log *slog.Logger) (*kubeAuth, error) {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return nil, fmt.Errorf("--trust-domain: %w", err)
	}
	rc, err := o.restConfig()
	if err != nil {
		return nil, err
	}
	base := kube.ClusterConfig{
		TrustDomain: td, Audiences: o.audiences, CacheTTL: o.cacheTTL, CacheSize: o.cacheSize, NoCache: o.cacheTTL == 0,
		NoBinding: o.noBinding, RequirePodBound: o.requirePodBound, QPS: o.qps, Burst: o.burst,
		Logger: log, Metrics: kube.NewMetrics(reg),
	}
	cluster := func(id string, rc *rest.Config) (*kube.Cluster, error) {
		cfg := base
		cfg.ID, cfg.REST = id, rc
		return kube.NewCluster(cfg)
	}
	router, err := multicluster.New(multicluster.Config{
		LocalID: o.clusterID,
		Build: func(id string, kc []byte) (multicluster.Member, error) {
			rc, err := clientcmd.RESTConfigFromKubeConfig(kc)
			if err != nil {
				return nil, err
			}
			return cluster(id, rc)
		},
		Logger: log,
	})
	if err != nil {
		return nil, err
	}
	local, err := cluster(o.clusterID, rc)
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, startupCheckTimeout)
	defer cancel()
	if err := router.Add(cctx, o.clusterID, local); err != nil {
		return nil, err
	}
	for _, spec := range o.remotes {
		id, path, ok := strings.Cut(spec, "=")
		if !ok || id == "" || path == "" {
			return nil, fmt.Errorf("--remote-kubeconfig %q: want ID=PATH", spec)
		}
		rrc, err := clientcmd.BuildConfigFromFlags("", path)
		if err != nil {
			return nil, fmt.Errorf("--remote-kubeconfig %s: %w", id, err)
		}
		remote, err := cluster(id, rrc)
		if err != nil {
			return nil, err
		}
		if err := router.Add(cctx, id, remote); err != nil {
			return nil, err
		}
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	k := &kubeAuth{client: client, router: router, local: local}
	if o.remoteSecrets {
		perms := []kube.Permission{{Verb: "list", Resource: "secrets", Namespace: namespace}, {Verb: "watch", Resource: "secrets", Namespace: namespace}}
		if err := kube.CheckAccess(cctx, client.AuthorizationV1().SelfSubjectAccessReviews(), o.clusterID, perms); err != nil {
			return nil, fmt.Errorf("%w (remote-cluster Secrets; or pass --remote-secrets=false)", err)
		}
		if k.watcher, err = multicluster.NewSecretWatcher(multicluster.SecretsConfig{
			Client: client, Namespace: namespace, Selector: o.secretSelector, Sink: router, Logger: log,
		}); err != nil {
			return nil, err
		}
	}
	log.Info("authenticating workloads with TokenReview", "cluster", o.clusterID, "audiences", o.audiences,
		"remote_clusters", len(o.remotes), "remote_secrets", o.remoteSecrets, "binding_checks", !o.noBinding)
	return k, nil
}

// inClusterNamespace is the namespace meshca's pod runs in, when it runs in
// one.
func inClusterNamespace() string {
	b, err := os.ReadFile("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}
