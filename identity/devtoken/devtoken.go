// Package devtoken is a development-only token authority for meshca.
//
// When `meshca dev` runs without a Kubernetes cluster there is no API server
// to issue and review service-account tokens, yet workloads still need a
// credential to present. An Authority fills that gap: it mints JWTs shaped
// like Kubernetes service-account tokens (same sub and "kubernetes.io"
// claims) and verifies them with the same key, so clients follow exactly the
// flow they would against a real cluster.
//
// Anyone who can read the key file can mint a token for any service account.
// Never use this package in production; use the Kubernetes authenticator.
package devtoken

import (
	"cmp"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/jonboulle/clockwork"
	"github.com/meshca/meshca/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

const (
	// DefaultIssuer is the iss claim used when Config.Issuer is empty.
	DefaultIssuer = "meshca-dev"
	// DefaultAudience is the audience used when Config.Audiences is empty.
	DefaultAudience = "meshca"
	// DefaultMaxTTL caps token lifetimes when Config.MaxTTL is zero.
	DefaultMaxTTL = 24 * time.Hour
	// DefaultTTL is the lifetime of a token minted without an explicit TTL.
	DefaultTTL = time.Hour

	// leeway tolerates clock skew between the minting and verifying sides.
	leeway = 30 * time.Second
	// maxTokenSize bounds the work an unauthenticated caller can cause.
	// Kubernetes tokens are around 1 KiB.
	maxTokenSize = 16 << 10
)

// Config configures an Authority.
type Config struct {
	// KeyFile holds the PEM-encoded P-256 signing key. It is created with
	// mode 0600 when missing and loaded when present, so tokens survive
	// restarts. Empty means an ephemeral in-memory key.
	KeyFile string
	// TrustDomain is the trust domain of the SPIFFE IDs callers receive.
	TrustDomain spiffeid.TrustDomain
	// Issuer is the iss claim; empty means DefaultIssuer.
	Issuer string
	// Audiences are accepted on verification and minted by default; empty
	// means [DefaultAudience].
	Audiences []string
	// ClusterID is the cluster this authority vouches for. Credentials
	// naming any other non-empty cluster are refused. Empty accepts only
	// "" and "Kubernetes", the value Istio sends by default.
	ClusterID string
	// Clock is the time source; nil means the real clock.
	Clock clockwork.Clock
	// Logger receives the development-only warning; nil means slog.Default().
	Logger *slog.Logger
	// MaxTTL caps the lifetime of minted tokens; zero means DefaultMaxTTL.
	MaxTTL time.Duration
}

// Authority mints and verifies development service-account tokens. It is
// safe for concurrent use.
type Authority struct {
	key       *ecdsa.PrivateKey
	signer    jose.Signer
	td        spiffeid.TrustDomain
	issuer    string
	audiences []string
	clusterID string
	clock     clockwork.Clock
	maxTTL    time.Duration
}

var _ identity.Authenticator = (*Authority)(nil)

// New loads or creates the signing key and returns an Authority. It starts
// no goroutines.
func New(cfg Config) (*Authority, error) {
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("devtoken: trust domain is required")
	}
	if cfg.MaxTTL < 0 {
		return nil, fmt.Errorf("devtoken: max TTL %v is negative", cfg.MaxTTL)
	}
	audiences := slices.Clone(cfg.Audiences)
	if len(audiences) == 0 {
		audiences = []string{DefaultAudience}
	}
	if slices.Contains(audiences, "") {
		return nil, errors.New("devtoken: audiences must not be empty strings")
	}

	key, created, err := loadOrCreateKey(cfg.KeyFile)
	if err != nil {
		return nil, err
	}
	jwk := jose.JSONWebKey{Key: key.Public()}
	thumb, err := jwk.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("devtoken: key thumbprint: %w", err)
	}
	// The kid lets a verifier holding several keys pick the right one, as
	// with real Kubernetes tokens.
	signer, err := jose.NewSigner(
		jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key, KeyID: hex.EncodeToString(thumb)}},
		(&jose.SignerOptions{}).WithType("JWT"),
	)
	if err != nil {
		return nil, fmt.Errorf("devtoken: creating signer: %w", err)
	}

	a := &Authority{
		key:       key,
		signer:    signer,
		td:        cfg.TrustDomain,
		issuer:    cmp.Or(cfg.Issuer, DefaultIssuer),
		audiences: audiences,
		clusterID: cfg.ClusterID,
		clock:     cfg.Clock,
		maxTTL:    cfg.MaxTTL,
	}
	if a.clock == nil {
		a.clock = clockwork.NewRealClock()
	}
	if a.maxTTL == 0 {
		a.maxTTL = DefaultMaxTTL
	}

	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	logger.Warn("development token issuer enabled: anyone who can read its key can mint any workload identity; do not use in production",
		"issuer", a.issuer,
		"trust_domain", a.td.Name(),
		"key_file", cfg.KeyFile,
		"key_created", created,
	)
	return a, nil
}

// PublicKey returns the key tokens are verified with.
func (a *Authority) PublicKey() crypto.PublicKey {
	return a.key.Public()
}

// MintRequest describes the token to mint.
type MintRequest struct {
	Namespace      string
	ServiceAccount string
	// Audiences default to the Authority's configured audiences.
	Audiences []string
	// TTL defaults to DefaultTTL and is capped at Config.MaxTTL.
	TTL time.Duration
	// Optional pod binding, as in a projected Kubernetes token.
	PodName  string
	PodUID   string
	NodeName string
}

// kubernetesClaims is the private claim Kubernetes puts in bound
// service-account tokens.
type kubernetesClaims struct {
	K8s *k8sInfo `json:"kubernetes.io,omitempty"`
}

type k8sInfo struct {
	Namespace      string  `json:"namespace"`
	ServiceAccount objRef  `json:"serviceaccount"`
	Pod            *objRef `json:"pod,omitempty"`
	Node           *objRef `json:"node,omitempty"`
}

type objRef struct {
	Name string `json:"name"`
	UID  string `json:"uid,omitempty"`
}

// Mint issues a token for the service account in req.
func (a *Authority) Mint(req MintRequest) (string, error) {
	if _, err := identity.WorkloadID(a.td, req.Namespace, req.ServiceAccount); err != nil {
		return "", fmt.Errorf("devtoken: %w", err)
	}
	ttl := req.TTL
	switch {
	case ttl < 0:
		return "", fmt.Errorf("devtoken: TTL %v is negative", ttl)
	case ttl == 0:
		ttl = DefaultTTL
	}
	ttl = min(ttl, a.maxTTL)
	audiences := slices.Clone(req.Audiences)
	if len(audiences) == 0 {
		audiences = slices.Clone(a.audiences)
	}
	now := a.clock.Now()
	std := jwt.Claims{
		Issuer:    a.issuer,
		Subject:   identity.ServiceAccountUserPrefix + req.Namespace + ":" + req.ServiceAccount,
		Audience:  jwt.Audience(audiences),
		Expiry:    jwt.NewNumericDate(now.Add(ttl)),
		NotBefore: jwt.NewNumericDate(now),
		IssuedAt:  jwt.NewNumericDate(now),
		ID:        rand.Text(),
	}
	info := &k8sInfo{
		Namespace:      req.Namespace,
		ServiceAccount: objRef{Name: req.ServiceAccount, UID: serviceAccountUID(req.Namespace, req.ServiceAccount)},
	}
	if req.PodName != "" || req.PodUID != "" {
		info.Pod = &objRef{Name: req.PodName, UID: req.PodUID}
	}
	if req.NodeName != "" {
		info.Node = &objRef{Name: req.NodeName}
	}
	token, err := jwt.Signed(a.signer).Claims(std).Claims(kubernetesClaims{K8s: info}).Serialize()
	if err != nil {
		return "", fmt.Errorf("devtoken: signing token: %w", err)
	}
	return token, nil
}

// Authenticate verifies a token minted by this Authority. Every check fails
// closed; errors carry an identity.Reason and never include the token.
func (a *Authority) Authenticate(_ context.Context, cred identity.Credential) (identity.Caller, error) {
	if cred.Token == "" {
		return identity.Caller{}, identity.Deny(identity.ReasonMissing, "no token presented")
	}
	// A token for another cluster cannot verify here; say so rather than
	// reporting a misleading signature failure.
	if !identity.ServesCluster(a.clusterID, cred.ClusterID) {
		return identity.Caller{}, identity.Deny(identity.ReasonUnknownCluster,
			"cluster %q is not served by this authority (want %s)", cred.ClusterID, a.wantCluster())
	}
	if len(cred.Token) > maxTokenSize {
		return identity.Caller{}, identity.Deny(identity.ReasonInvalid,
			"token is %d bytes, more than the %d allowed", len(cred.Token), maxTokenSize)
	}

	// Restricting the algorithm at parse time rules out "none", HMAC with
	// the public key as secret, and any other algorithm confusion.
	tok, err := jwt.ParseSigned(cred.Token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return identity.Caller{}, identity.Deny(identity.ReasonInvalid, "parsing token: %w", err)
	}
	var (
		std jwt.Claims
		kc  kubernetesClaims
	)
	if err := tok.Claims(a.key.Public(), &std, &kc); err != nil {
		return identity.Caller{}, identity.Deny(identity.ReasonInvalid, "verifying token: %w", err)
	}

	if std.Issuer != a.issuer {
		return identity.Caller{}, identity.Deny(identity.ReasonInvalid,
			"token issuer %q is not %q", std.Issuer, a.issuer)
	}
	if err := a.checkTimes(std); err != nil {
		return identity.Caller{}, err
	}
	if !slices.ContainsFunc(std.Audience, func(aud string) bool { return slices.Contains(a.audiences, aud) }) {
		return identity.Caller{}, identity.Deny(identity.ReasonWrongAudience,
			"token audiences %q do not include any of %q", []string(std.Audience), a.audiences)
	}

	ns, sa, ok := identity.ParseServiceAccountUser(std.Subject)
	if !ok {
		return identity.Caller{}, identity.Deny(identity.ReasonNotServiceAccount,
			"token subject %q is not a service account", std.Subject)
	}
	info := kc.K8s
	if info == nil {
		return identity.Caller{}, identity.Deny(identity.ReasonNotServiceAccount,
			"token has no kubernetes.io claim")
	}
	if info.Namespace != ns || info.ServiceAccount.Name != sa {
		return identity.Caller{}, identity.Deny(identity.ReasonNotServiceAccount,
			"token subject %q does not match its kubernetes.io claim (namespace %q, service account %q)",
			std.Subject, info.Namespace, info.ServiceAccount.Name)
	}
	id, err := identity.WorkloadID(a.td, ns, sa)
	if err != nil {
		return identity.Caller{}, identity.Deny(identity.ReasonNotServiceAccount, "%w", err)
	}

	caller := identity.Caller{
		ID:             id,
		Namespace:      ns,
		ServiceAccount: sa,
		ClusterID:      a.clusterID,
		TokenHash:      identity.HashToken(cred.Token),
		Expiry:         std.Expiry.Time(),
	}
	if info.Pod != nil {
		caller.PodName, caller.PodUID = info.Pod.Name, info.Pod.UID
	}
	if info.Node != nil {
		caller.NodeName = info.Node.Name
	}
	return caller, nil
}

func (a *Authority) wantCluster() string {
	if a.clusterID == "" {
		return fmt.Sprintf("%q or %q", "", identity.IstioDefaultCluster)
	}
	return fmt.Sprintf("%q or %q", "", a.clusterID)
}

// checkTimes requires an expiry (a token without one would be valid
// forever) and honours nbf and iat, all with leeway for clock skew.
func (a *Authority) checkTimes(c jwt.Claims) error {
	now := a.clock.Now()
	if c.Expiry == nil {
		return identity.Deny(identity.ReasonInvalid, "token has no expiry")
	}
	if exp := c.Expiry.Time(); now.After(exp.Add(leeway)) {
		return identity.Deny(identity.ReasonExpired,
			"token expired at %s, now is %s", exp.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if c.NotBefore != nil {
		if nbf := c.NotBefore.Time(); now.Add(leeway).Before(nbf) {
			return identity.Deny(identity.ReasonExpired,
				"token not valid before %s, now is %s", nbf.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
		}
	}
	if c.IssuedAt != nil {
		if iat := c.IssuedAt.Time(); now.Add(leeway).Before(iat) {
			return identity.Deny(identity.ReasonExpired,
				"token issued in the future at %s, now is %s", iat.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
		}
	}
	return nil
}

// serviceAccountUID derives a stable UID for a service account, as the API
// server would keep one for the object's lifetime. It is formatted as an
// RFC 9562 version 8 (custom) UUID.
func serviceAccountUID(ns, sa string) string {
	sum := sha256.Sum256([]byte("meshca-dev/serviceaccount/" + ns + "/" + sa))
	u := sum[:16]
	u[6] = u[6]&0x0f | 0x80
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}
