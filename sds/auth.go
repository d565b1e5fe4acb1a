package sds

import (
	"context"

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
		cred, err := identity.CredentialFromMetadata(md.Get)
		if err != nil {
			return Peer{}, err
		}
		c, err := a.Authenticate(ctx, cred)
		if err != nil {
			return Peer{}, err
		}
		return Peer{ID: c.ID}, nil
	}
}
