package identity

import (
	"strings"
)

// Metadata keys of the Istio CA and SDS protocols: the bearer token and the
// cluster that issued it. gRPC lower-cases keys, so Istio's "ClusterID"
// arrives as "clusterid".
const (
	AuthorizationKey = "authorization"
	ClusterIDKey     = "clusterid"
)

// IstioDefaultCluster is the ClusterID Istio's agent sends unless told
// otherwise.
const IstioDefaultCluster = "Kubernetes"

// ServesCluster reports whether the authority of cluster own answers for a
// credential naming cluster id: one naming no cluster or own, and, when own
// is empty, one naming IstioDefaultCluster.
func ServesCluster(own, id string) bool {
	if id == "" || id == own {
		return true
	}
	return own == "" && id == IstioDefaultCluster
}

// ErrNoBearerToken is the denial for a request without exactly one bearer
// token.
var ErrNoBearerToken = Deny(ReasonMissing, "no bearer token in the %q metadata", AuthorizationKey)

// CredentialFromMetadata reads a credential from request metadata; get
// returns a key's values (grpc's metadata.MD.Get). Exactly one
// "Bearer <token>" value is accepted, the scheme in any case (RFC 6750).
func CredentialFromMetadata(get func(key string) []string) (Credential, error) {
	values := get(AuthorizationKey)
	if len(values) != 1 {
		return Credential{}, ErrNoBearerToken
	}
	scheme, token, ok := strings.Cut(strings.TrimSpace(values[0]), " ")
	token = strings.TrimSpace(token)
	if !ok || !strings.EqualFold(scheme, "bearer") || token == "" {
		return Credential{}, ErrNoBearerToken
	}
	cred := Credential{Token: token}
	if v := get(ClusterIDKey); len(v) > 0 {
		cred.ClusterID = v[0]
	}
	if len(cred.ClusterID) > 253 {
		return Credential{}, Deny(ReasonUnknownCluster, "cluster ID of %d bytes", len(cred.ClusterID))
	}
	return cred, nil
}
