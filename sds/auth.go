package sds

import (
	"context"
	"strings"

	"google.golang.org/grpc/metadata"

	"github.com/meshca/meshca/identity"
)

// BearerAuthenticator returns a Config.Authenticate for the central server:
// the proxy presents its workload token as "authorization: Bearer <token>"
// (and optionally the cluster in "clusterid"), as Istio's agents do, and is
// served the identity the token proves.
func BearerAuthenticator(a identity.Authenticator) func(ctx context.Context) (Peer, error) {
	return func(ctx context.Context) (Peer, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		token, ok := bearerToken(md.Get("authorization"))
		if !ok {
			return Peer{}, identity.Deny(identity.ReasonMissing, `no bearer token in the "authorization" metadata`)
		}
		var cluster string
		if v := md.Get("clusterid"); len(v) > 0 {
			cluster = v[0]
		}
		c, err := a.Authenticate(ctx, identity.Credential{Token: token, ClusterID: cluster})
		if err != nil {
			return Peer{}, err
		}
		return Peer{ID: c.ID}, nil
	}
}

// bearerToken accepts exactly one "Bearer <token>" value, the scheme in any
// case (RFC 6750).
func bearerToken(values []string) (string, bool) {
	if len(values) != 1 {
		return "", false
	}
	scheme, token, ok := strings.Cut(strings.TrimSpace(values[0]), " ")
	token = strings.TrimSpace(token)
	if !ok || !strings.EqualFold(scheme, "bearer") || token == "" {
		return "", false
	}
	return token, true
}
