// Package identity turns a workload's credential (a service-account token)
// into a verified Caller with a SPIFFE ID. Identity comes from the verified
// credential only, never from anything the workload asks for.
package identity

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Credential is what a workload presents.
type Credential struct {
	// Token is the bearer token, without the "Bearer " prefix.
	Token string
	// ClusterID selects the cluster that issued the token in multi-cluster
	// meshes; empty means the local cluster.
	ClusterID string
}

// Caller is an authenticated workload.
type Caller struct {
	ID             spiffeid.ID
	Namespace      string
	ServiceAccount string
	// ServiceAccountUID tells a service account from a later one of the
	// same name; empty when the authority does not report it.
	ServiceAccountUID string
	// Pod binding, when the token was bound to a pod.
	PodName  string
	PodUID   string
	NodeName string
	// ClusterID is the cluster whose authority vouched for the token.
	ClusterID string
	// TokenHash identifies the token in logs and audit records without
	// revealing it.
	TokenHash string
	// Expiry is when the token stops being valid; zero when unknown.
	Expiry time.Time
}

// Authenticator verifies a credential and returns the caller it proves.
// Implementations fail closed: any doubt is an error.
type Authenticator interface {
	Authenticate(ctx context.Context, cred Credential) (Caller, error)
}

// Reason classifies why authentication failed, for metrics, audit records and
// the mapping to gRPC status codes at the edge.
type Reason string

// Denial reasons.
const (
	ReasonMissing           Reason = "missing-token"
	ReasonInvalid           Reason = "invalid-token"
	ReasonExpired           Reason = "expired-token"
	ReasonWrongAudience     Reason = "wrong-audience"
	ReasonNotServiceAccount Reason = "not-service-account"
	ReasonUnknownPod        Reason = "unknown-pod"
	// ReasonNotPodBound: policy requires a pod-bound token and this one is
	// bound to no pod.
	ReasonNotPodBound Reason = "not-pod-bound"
	// ReasonUnknownServiceAccount: the token's service account has been
	// deleted (or replaced by another of the same name).
	ReasonUnknownServiceAccount Reason = "unknown-service-account"
	ReasonUnknownCluster        Reason = "unknown-cluster"
	// ReasonUnavailable means the credential could not be checked at all,
	// for example because the token authority is unreachable.
	ReasonUnavailable Reason = "authority-unavailable"
)

// Error is an authentication failure with its reason class.
type Error struct {
	Reason Reason
	Err    error
}

func (e *Error) Error() string {
	if e.Err == nil {
		return "identity: " + string(e.Reason)
	}
	return fmt.Sprintf("identity: %s: %v", e.Reason, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// Deny builds an *Error of the given reason.
func Deny(r Reason, format string, args ...any) error {
	return &Error{Reason: r, Err: fmt.Errorf(format, args...)}
}

// ReasonOf returns the reason class of err, or "" when err is not an
// authentication failure.
func ReasonOf(err error) Reason {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}

// WorkloadID maps a Kubernetes service account to its SPIFFE ID,
// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>. Both labels
// must be valid Kubernetes DNS labels / subdomain names.
func WorkloadID(td spiffeid.TrustDomain, namespace, serviceAccount string) (spiffeid.ID, error) {
	if err := validateLabel("namespace", namespace, 63); err != nil {
		return spiffeid.ID{}, err
	}
	if err := validateLabel("service account", serviceAccount, 253); err != nil {
		return spiffeid.ID{}, err
	}
	id, err := spiffeid.FromSegments(td, "ns", namespace, "sa", serviceAccount)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("identity: %w", err)
	}
	return id, nil
}

// WorkloadOf is the inverse of WorkloadID: the namespace and service
// account a workload ID names, or ok false for an ID of another shape.
func WorkloadOf(id spiffeid.ID) (namespace, serviceAccount string, ok bool) {
	parts := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" {
		return "", "", false
	}
	return parts[1], parts[3], true
}

// ServiceAccountUserPrefix starts the user name Kubernetes gives a service
// account, and the sub claim of its tokens.
const ServiceAccountUserPrefix = "system:serviceaccount:"

// ParseServiceAccountUser splits a service account's Kubernetes user name,
// "system:serviceaccount:<namespace>:<name>". It checks the shape only;
// WorkloadID validates the names.
func ParseServiceAccountUser(user string) (namespace, serviceAccount string, ok bool) {
	rest, ok := strings.CutPrefix(user, ServiceAccountUserPrefix)
	if !ok {
		return "", "", false
	}
	namespace, serviceAccount, ok = strings.Cut(rest, ":")
	if !ok || namespace == "" || serviceAccount == "" || strings.Contains(serviceAccount, ":") {
		return "", "", false
	}
	return namespace, serviceAccount, true
}

// validateLabel accepts lower-case RFC 1123 names: dot-separated labels of
// the form [a-z0-9]([-a-z0-9]*[a-z0-9])?. Namespaces may not contain dots;
// service-account names may.
func validateLabel(what, s string, maxLen int) error {
	if s == "" || len(s) > maxLen {
		return fmt.Errorf("identity: %s %q must be 1-%d characters", what, s, maxLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		var ok bool
		switch {
		case isAlnum(c):
			ok = true
		case c == '-':
			ok = i > 0 && i < len(s)-1
		case c == '.' && what != "namespace":
			// Each dot-separated label must start and end alphanumeric,
			// which rules out "a..b", "a.-b" and "a-.b".
			ok = i > 0 && i < len(s)-1 && isAlnum(s[i-1]) && isAlnum(s[i+1])
		}
		if !ok {
			return fmt.Errorf("identity: %s %q is not a valid Kubernetes name", what, s)
		}
	}
	return nil
}

func isAlnum(c byte) bool { return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' }

// HashToken returns a short, stable, non-reversible fingerprint of a token.
func HashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:16])
}
