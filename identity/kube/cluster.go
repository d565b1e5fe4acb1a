package kube

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/identity"
)

// Client rate limits. client-go's own default (5 QPS, burst 10) would
// throttle a fleet restart; with the review cache, 50 QPS serves thousands
// of new pods a minute.
const (
	DefaultQPS   = 50
	DefaultBurst = 100
)

// ClusterConfig configures one cluster's authenticator.
type ClusterConfig struct {
	// ID is the ClusterID workloads of this cluster send (Istio's default
	// is "Kubernetes").
	ID          string
	REST        *rest.Config
	TrustDomain spiffeid.TrustDomain
	Audiences   []string
	CacheTTL    time.Duration
	CacheSize   int
	NoCache     bool
	// NoBinding turns off the informer-backed pod and service-account
	// checks (and the permissions they need).
	NoBinding       bool
	RequirePodBound bool
	// QPS and Burst limit this cluster's client (defaults DefaultQPS and
	// DefaultBurst).
	QPS     float32
	Burst   int
	Clock   clockwork.Clock
	Logger  *slog.Logger
	Metrics *Metrics
}

// Cluster authenticates the tokens of one cluster: a TokenReview
// authenticator with its own cache and its own informers.
type Cluster struct {
	id     string
	client kubernetes.Interface
	auth   *Authenticator
	index  *Index // nil with NoBinding
	perms  []Permission
}

// NewCluster builds the clients; it makes no API call.
func NewCluster(cfg ClusterConfig) (*Cluster, error) {
	if cfg.REST == nil {
		return nil, fmt.Errorf("kube: cluster %q has no client configuration", cfg.ID)
	}
	rc := rest.CopyConfig(cfg.REST)
	rc.QPS, rc.Burst = cfg.QPS, cfg.Burst
	if rc.QPS <= 0 {
		rc.QPS = DefaultQPS
	}
	if rc.Burst <= 0 {
		rc.Burst = DefaultBurst
	}
	rc.UserAgent = "meshca"
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kube: cluster %q: %w", cfg.ID, err)
	}
	c := &Cluster{id: cfg.ID, client: client, perms: RequiredPermissions(!cfg.NoBinding)}
	var objects Objects
	if !cfg.NoBinding {
		if c.index, err = NewIndex(IndexConfig{Client: client, Cluster: cfg.ID, Clock: cfg.Clock, Logger: cfg.Logger, Metrics: cfg.Metrics}); err != nil {
			return nil, err
		}
		objects = c.index
	}
	c.auth, err = New(Config{
		TrustDomain: cfg.TrustDomain, Reviewer: client.AuthenticationV1().TokenReviews(),
		Audiences: cfg.Audiences, ClusterID: cfg.ID, CacheTTL: cfg.CacheTTL, CacheSize: cfg.CacheSize, NoCache: cfg.NoCache,
		Objects: objects, RequirePodBound: cfg.RequirePodBound,
		Clock: cfg.Clock, Logger: cfg.Logger, Metrics: cfg.Metrics,
	})
	if err != nil {
		return nil, err
	}
	return c, nil
}

// ID returns the cluster's ID.
func (c *Cluster) ID() string { return c.id }

// Authenticate implements identity.Authenticator.
func (c *Cluster) Authenticate(ctx context.Context, cred identity.Credential) (identity.Caller, error) {
	return c.auth.Authenticate(ctx, cred)
}

// CheckAccess verifies with SelfSubjectAccessReviews that meshca may do
// everything this cluster's authenticator needs.
func (c *Cluster) CheckAccess(ctx context.Context) error {
	return CheckAccess(ctx, c.client.AuthorizationV1().SelfSubjectAccessReviews(), c.id, c.perms)
}

// Run runs the informers until ctx ends.
func (c *Cluster) Run(ctx context.Context) error {
	if c.index == nil {
		<-ctx.Done()
		return nil
	}
	return c.index.Run(ctx)
}

// Ready reports whether the informers have synced; before then binding
// checks fall back to API calls.
func (c *Cluster) Ready() error {
	if c.index != nil && !c.index.Synced() {
		return fmt.Errorf("kube: cluster %q: pod and service-account informers not synced yet", c.id)
	}
	return nil
}

// WaitForSync blocks until the informers have synced or ctx ends.
func (c *Cluster) WaitForSync(ctx context.Context) error {
	if c.index == nil {
		return nil
	}
	return c.index.WaitForSync(ctx)
}
