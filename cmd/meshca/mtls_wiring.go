package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/kube"
	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/kubestore"
	"github.com/meshca/meshca/internal/server"
)

// mtlsPolicyFile holds the mesh mTLS policy in a data directory.
const mtlsPolicyFile = "mtls-policy.json"

// mtlsOptions say where the mesh mTLS policy is kept.
type mtlsOptions struct {
	file string
	// configMap, in the server's namespace, keeps the policy when the
	// server has a Kubernetes client; "" keeps it in file.
	configMap     string
	clusterDomain string
}

func (o *mtlsOptions) bind(fs *pflag.FlagSet, cluster bool) {
	if cluster {
		fs.StringVar(&o.configMap, "mtls-configmap", "meshca-mesh-policy", `ConfigMap in --namespace that holds the mesh mTLS policy, with --authenticator=kube; "" keeps it in --mtls-policy-file instead`)
		fs.StringVar(&o.file, "mtls-policy-file", "", "file holding the mesh mTLS policy when it is not in a ConfigMap (default <data-dir>/"+mtlsPolicyFile+")")
	} else {
		fs.StringVar(&o.file, "mtls-policy-file", "", "file holding the mesh mTLS policy (default <data-dir>/"+mtlsPolicyFile+")")
	}
	fs.StringVar(&o.clusterDomain, "cluster-domain", "cluster.local", "the cluster's DNS domain: services are <name>.<namespace>.svc.<domain> in mTLS plans and Istio renderings")
}

// inDataDir returns o with the policy file defaulted into dir.
func (o mtlsOptions) inDataDir(dir string) mtlsOptions {
	if o.file == "" {
		o.file = filepath.Join(dir, mtlsPolicyFile)
	}
	return o
}

// kubeClientOf is the local cluster's client when workloads are
// authenticated with Kubernetes, else nil.
func kubeClientOf(authn identity.Authenticator) kubernetes.Interface {
	if k, ok := authn.(*kubeAuth); ok {
		return k.client
	}
	return nil
}

// mtlsInConfigMap says where the mesh mTLS policy is kept: in the
// ConfigMap when the server has a Kubernetes client and --mtls-configmap
// names one, in the file otherwise.
func mtlsInConfigMap(c stackConfig) bool {
	return kubeClientOf(c.authn) != nil && c.mtls.configMap != ""
}

// mtlsStoreName names the store buildMTLSStore makes, for status.
func mtlsStoreName(c stackConfig) string {
	if mtlsInConfigMap(c) {
		return "configmap " + c.listen.namespace + "/" + c.mtls.configMap
	}
	return "file " + c.mtls.file
}

// buildMTLSStore makes the store of the mesh mTLS policy, where
// mtlsInConfigMap says. It starts nothing; the stack runs it.
func buildMTLSStore(ctx context.Context, c stackConfig, reg prometheus.Registerer) (policy.Store, error) {
	log := c.log.With("component", "mtls-policy")
	m := policy.NewMetrics(reg)
	if !mtlsInConfigMap(c) {
		if c.mtls.file == "" {
			return nil, errors.New("--mtls-policy-file: no policy file")
		}
		return policy.NewFileStore(policy.FileConfig{Path: c.mtls.file, Logger: log, Metrics: m})
	}
	client, ns := kubeClientOf(c.authn), c.listen.namespace
	// Without these the store never syncs and /readyz says so; the
	// minimal deployment that issues certificates still starts.
	cctx, cancel := context.WithTimeout(ctx, startupCheckTimeout)
	defer cancel()
	var perms []kube.Permission
	for _, verb := range []string{"get", "list", "watch", "create", "update"} {
		perms = append(perms, kube.Permission{Verb: verb, Resource: "configmaps", Namespace: ns})
	}
	if err := kube.CheckAccess(cctx, client.AuthorizationV1().SelfSubjectAccessReviews(), "local", perms); err != nil {
		log.Warn("The mTLS policy ConfigMap is out of reach; the policy cannot be read or changed, and /readyz stays unready, until this is fixed (or pass --mtls-configmap=\"\" to keep it in a file)",
			"configmap", ns+"/"+c.mtls.configMap, "err", err)
	}
	return kubestore.New(kubestore.Config{Client: client, Namespace: ns, Name: c.mtls.configMap, Logger: log, Metrics: m})
}

// mtlsReadiness is the policy store's /readyz check: not ready until the
// stored policy has been read once, so that nothing serves a default
// nobody chose; degraded while the newest stored version is malformed and
// the last good one stays in force.
func mtlsReadiness(s policy.Store) server.Check {
	return func() error {
		st := s.Status()
		switch {
		case !s.Synced() && st.Err != nil:
			return fmt.Errorf("mTLS policy not read yet: %w", st.Err)
		case !s.Synced():
			return errors.New("mTLS policy not read yet")
		case st.Err != nil:
			return server.Degraded(fmt.Errorf("the newest mTLS policy is not in force, the last good one is: %w", st.Err))
		}
		return nil
	}
}

// mtlsRoutes serves the mTLS policy on the admin API. Plans list services
// from the local cluster and find proxies among this server's SDS streams
// (admin.ConnectedProxies); without a cluster, plans are refused.
func (s *stack) mtlsRoutes(c stackConfig) ([]admin.Route, error) {
	cfg := admin.MTLSConfig{
		Store:         s.mtlsStore,
		StoreName:     mtlsStoreName(c),
		ClusterDomain: c.mtls.clusterDomain,
		Proxies:       admin.ConnectedProxies(s.sds),
		NoInventory:   "no Kubernetes API server to list services from (meshca dev without --kubeconfig, or --authenticator=dev)",
	}
	if client := kubeClientOf(c.authn); client != nil {
		inv, err := kubestore.NewInventory(kubestore.InventoryConfig{Client: client, ClusterDomain: c.mtls.clusterDomain})
		if err != nil {
			return nil, fmt.Errorf("--cluster-domain: %w", err)
		}
		cfg.Inventory = inv
	}
	return admin.MTLSRoutes(cfg), nil
}
