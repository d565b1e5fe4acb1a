package kube

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/singleflight"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/identity"
)

// Reviewer creates TokenReviews; client-go's
// AuthenticationV1().TokenReviews() is one.
type Reviewer interface {
	Create(ctx context.Context, tr *authnv1.TokenReview, opts metav1.CreateOptions) (*authnv1.TokenReview, error)
}

// Extra keys the API server sets for pod-bound tokens.
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"
	saGroup       = "system:serviceaccounts"
	// reviewTimeout bounds one TokenReview call.
	reviewTimeout = 10 * time.Second
)

// Config configures an Authenticator.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	Reviewer    Reviewer
	// Audiences the token must carry (default ["meshca"]).
	Audiences []string
	// ClusterID is the cluster this authenticator answers for; requests
	// naming another are refused. Empty accepts "" and "Kubernetes".
	ClusterID string
	// CacheTTL caps how long a successful review is reused (default 5m);
	// the token's own expiry caps it further.
	CacheTTL time.Duration
	// CacheSize bounds the number of cached identities (default 10,000).
	CacheSize int
	// NoCache reviews every request, concurrent ones included: one API
	// call per certificate. For comparison and debugging only.
	NoCache bool
	// Objects, when set, is asked on every request (cached or not) whether
	// the token's pod and service account still exist, so deleting either
	// revokes the identity at once rather than when the cache entry ends.
	Objects Objects
	// RequirePodBound refuses tokens not bound to a pod: a token that
	// leaves its pod is then useless once the pod is gone.
	RequirePodBound bool
	Clock           clockwork.Clock
	Logger          *slog.Logger
	Metrics         *Metrics
}

// Authenticator implements identity.Authenticator with TokenReview.
type Authenticator struct {
	cfg    Config
	clock  clockwork.Clock
	log    *slog.Logger
	cache  *cache
	flight singleflight.Group
	// hashKey keys the cache's token hashes, so the cache holds nothing a
	// reader of memory could replay or reverse.
	hashKey []byte
	// audiences prefixes every hashed token, NUL-separated, so a review
	// for one set of audiences never answers for another.
	audiences []byte
}

var _ identity.Authenticator = (*Authenticator)(nil)

// New validates cfg. It makes no API call.
func New(cfg Config) (*Authenticator, error) {
	if cfg.TrustDomain.IsZero() || cfg.Reviewer == nil {
		return nil, fmt.Errorf("kube: a trust domain and a TokenReview client are required")
	}
	if len(cfg.Audiences) == 0 {
		cfg.Audiences = []string{"meshca"}
	}
	for _, a := range cfg.Audiences {
		if strings.TrimSpace(a) == "" {
			return nil, fmt.Errorf("kube: empty audience")
		}
	}
	if cfg.CacheTTL <= 0 {
		cfg.CacheTTL = 5 * time.Minute
	}
	if cfg.CacheSize <= 0 {
		cfg.CacheSize = 10000
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("kube: %w", err)
	}
	return &Authenticator{cfg: cfg, clock: cfg.Clock, log: cfg.Logger, cache: newCache(cfg.CacheSize), hashKey: key,
		audiences: []byte(strings.Join(cfg.Audiences, "\x00") + "\x00")}, nil
}

// Authenticate reviews cred.Token with the API server, or answers from the
// cache, then checks that what the token is bound to still exists.
func (a *Authenticator) Authenticate(ctx context.Context, cred identity.Credential) (identity.Caller, error) {
	if cred.Token == "" {
		return identity.Caller{}, identity.Deny(identity.ReasonMissing, "no token")
	}
	if !identity.ServesCluster(a.cfg.ClusterID, cred.ClusterID) {
		return identity.Caller{}, identity.Deny(identity.ReasonUnknownCluster, "unknown cluster %q", cred.ClusterID)
	}
	key := a.cacheKey(cred.Token)
	c, err := a.reviewed(ctx, key, cred.Token)
	if err != nil {
		return identity.Caller{}, err
	}
	if err := a.checkBinding(ctx, &c); err != nil {
		a.cache.remove(key)
		return identity.Caller{}, err
	}
	return c, nil
}

// reviewed answers from the cache or, sharing one call among concurrent
// requests for the same token, from the API server.
func (a *Authenticator) reviewed(ctx context.Context, key, token string) (identity.Caller, error) {
	if a.cfg.NoCache {
		rctx, cancel := context.WithTimeout(ctx, reviewTimeout)
		defer cancel()
		return a.review(rctx, token)
	}
	if c, ok := a.cache.get(key, a.clock.Now()); ok {
		a.cfg.Metrics.cache.WithLabelValues(a.cfg.ClusterID, "hit").Inc()
		return c, nil
	}
	a.cfg.Metrics.cache.WithLabelValues(a.cfg.ClusterID, "miss").Inc()
	v, err, _ := a.flight.Do(key, func() (any, error) {
		// A concurrent call may have filled the cache while this one waited
		// to become the leader.
		if c, ok := a.cache.get(key, a.clock.Now()); ok {
			return c, nil
		}
		// The review is shared by every waiter, so it must not die with the
		// first caller's context.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), reviewTimeout)
		defer cancel()
		c, err := a.review(rctx, token)
		if err != nil {
			return identity.Caller{}, err
		}
		a.cache.put(key, c, a.expiry(c, a.clock.Now()))
		return c, nil
	})
	if err != nil {
		return identity.Caller{}, err
	}
	return v.(identity.Caller), nil
}

// checkBinding enforces the pod-bound policy and, with Objects, that the
// token's pod and service account are still the ones it was issued for.
// It fills in the node when the token did not name it.
func (a *Authenticator) checkBinding(ctx context.Context, c *identity.Caller) error {
	if a.cfg.RequirePodBound && (c.PodName == "" || c.PodUID == "") {
		return identity.Deny(identity.ReasonNotPodBound,
			"token of %s/%s is not bound to a pod, and this server requires pod-bound tokens", c.Namespace, c.ServiceAccount)
	}
	if a.cfg.Objects == nil {
		return nil
	}
	if c.ServiceAccountUID != "" {
		if err := a.cfg.Objects.ServiceAccount(ctx, c.Namespace, c.ServiceAccount, c.ServiceAccountUID); err != nil {
			return bindingDenial(identity.ReasonUnknownServiceAccount, err)
		}
	}
	if c.PodName != "" {
		node, err := a.cfg.Objects.Pod(ctx, c.Namespace, c.PodName, c.PodUID)
		if err != nil {
			return bindingDenial(identity.ReasonUnknownPod, err)
		}
		if c.NodeName == "" {
			c.NodeName = node
		}
	}
	return nil
}

func bindingDenial(r identity.Reason, err error) error {
	if errors.Is(err, ErrGone) {
		return identity.Deny(r, "%v", err)
	}
	return identity.Deny(identity.ReasonUnavailable, "%v", err)
}

func (a *Authenticator) cacheKey(token string) string {
	m := hmac.New(sha256.New, a.hashKey)
	m.Write(a.audiences)
	m.Write([]byte(token))
	return string(m.Sum(nil))
}

// expiry bounds a cache entry by the token's own expiry and the ceiling.
func (a *Authenticator) expiry(c identity.Caller, now time.Time) time.Time {
	until := now.Add(a.cfg.CacheTTL)
	if !c.Expiry.IsZero() && c.Expiry.Before(until) {
		until = c.Expiry
	}
	return until
}

func (a *Authenticator) review(ctx context.Context, token string) (identity.Caller, error) {
	begin := a.clock.Now()
	tr, err := a.cfg.Reviewer.Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: a.cfg.Audiences},
	}, metav1.CreateOptions{})
	a.cfg.Metrics.latency.WithLabelValues(a.cfg.ClusterID).Observe(a.clock.Since(begin).Seconds())
	if err != nil {
		a.cfg.Metrics.reviews.WithLabelValues(a.cfg.ClusterID, "error").Inc()
		return identity.Caller{}, identity.Deny(identity.ReasonUnavailable, "TokenReview: %v", err)
	}
	st := tr.Status
	if !st.Authenticated {
		a.cfg.Metrics.reviews.WithLabelValues(a.cfg.ClusterID, "refused").Inc()
		return identity.Caller{}, classify(st.Error)
	}
	a.cfg.Metrics.reviews.WithLabelValues(a.cfg.ClusterID, "authenticated").Inc()
	// The API server returns the audiences it checked; an empty answer means
	// it (or a webhook behind it) ignored them, and the token may have been
	// minted for anyone.
	if !intersects(st.Audiences, a.cfg.Audiences) {
		return identity.Caller{}, identity.Deny(identity.ReasonWrongAudience,
			"API server confirmed audiences %v, none of %v", st.Audiences, a.cfg.Audiences)
	}
	ns, sa, ok := serviceAccount(st.User)
	if !ok {
		return identity.Caller{}, identity.Deny(identity.ReasonNotServiceAccount,
			"token belongs to %q, not a service account", st.User.Username)
	}
	id, err := identity.WorkloadID(a.cfg.TrustDomain, ns, sa)
	if err != nil {
		return identity.Caller{}, identity.Deny(identity.ReasonNotServiceAccount, "%v", err)
	}
	return identity.Caller{
		ID:             id,
		Namespace:      ns,
		ServiceAccount: sa,
		// For service accounts the API server reports the account's UID.
		ServiceAccountUID: st.User.UID,
		PodName:           first(st.User.Extra[extraPodName]),
		PodUID:            first(st.User.Extra[extraPodUID]),
		NodeName:          first(st.User.Extra[extraNodeName]),
		ClusterID:         a.cfg.ClusterID,
		TokenHash:         identity.HashToken(token),
		Expiry:            tokenExpiry(token),
	}, nil
}

// classify maps the API server's reason for refusing a token to a Reason.
// The messages are the API server's own; matching them is the only way to
// tell an expired token from a forged one.
func classify(msg string) error {
	switch lower := strings.ToLower(msg); {
	case strings.Contains(lower, "audience"):
		return identity.Deny(identity.ReasonWrongAudience, "API server: %s", msg)
	case strings.Contains(lower, "expired"):
		return identity.Deny(identity.ReasonExpired, "API server: %s", msg)
	case strings.Contains(lower, "not found") || strings.Contains(lower, "has been deleted") || strings.Contains(lower, "does not match"):
		return identity.Deny(identity.ReasonInvalid, "API server: %s", msg)
	case msg == "":
		return identity.Deny(identity.ReasonInvalid, "API server did not authenticate the token")
	default:
		return identity.Deny(identity.ReasonInvalid, "API server: %s", msg)
	}
}

func serviceAccount(u authnv1.UserInfo) (ns, sa string, ok bool) {
	if !slices.Contains(u.Groups, saGroup) {
		return "", "", false
	}
	return identity.ParseServiceAccountUser(u.Username)
}

func intersects(a, b []string) bool {
	for _, x := range a {
		if slices.Contains(b, x) {
			return true
		}
	}
	return false
}

func first(v authnv1.ExtraValue) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

// tokenExpiry reads the exp claim of a JWT without verifying it: the API
// server has verified the token; exp only bounds how long the answer is
// reused. Zero when absent or unreadable.
func tokenExpiry(token string) time.Time {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}
	}
	var claims struct {
		Exp json.Number `json:"exp"`
	}
	if json.Unmarshal(payload, &claims) != nil {
		return time.Time{}
	}
	exp, err := claims.Exp.Int64()
	if err != nil {
		return time.Time{}
	}
	return time.Unix(exp, 0).UTC()
}
