package kube

import (
	"context"
	"fmt"
	"strings"

	authzv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Permission is one thing meshca must be allowed to do in a cluster.
type Permission struct {
	Verb, Group, Resource string
	// Namespace scopes the permission; empty means cluster-wide.
	Namespace string
}

func (p Permission) String() string {
	r := p.Resource
	if p.Group != "" {
		r += "." + p.Group
	}
	if p.Namespace != "" {
		return p.Verb + " " + r + " in namespace " + p.Namespace
	}
	return p.Verb + " " + r + " (cluster-wide)"
}

// RequiredPermissions lists what an authenticator needs: creating
// TokenReviews and, when binding checks are on, watching pods and service
// accounts cluster-wide.
func RequiredPermissions(binding bool) []Permission {
	ps := []Permission{{Verb: "create", Group: "authentication.k8s.io", Resource: "tokenreviews"}}
	if binding {
		for _, res := range []string{"pods", "serviceaccounts"} {
			for _, verb := range []string{"get", "list", "watch"} {
				ps = append(ps, Permission{Verb: verb, Resource: res})
			}
		}
	}
	return ps
}

// AccessReviewer creates SelfSubjectAccessReviews; client-go's
// AuthorizationV1().SelfSubjectAccessReviews() is one.
type AccessReviewer interface {
	Create(ctx context.Context, r *authzv1.SelfSubjectAccessReview, opts metav1.CreateOptions) (*authzv1.SelfSubjectAccessReview, error)
}

// CheckAccess asks the API server whether meshca's own credentials hold
// every permission in perms, so a missing RBAC rule fails at start-up with
// its name rather than as refused workloads later.
func CheckAccess(ctx context.Context, r AccessReviewer, cluster string, perms []Permission) error {
	var missing []string
	for _, p := range perms {
		res, err := r.Create(ctx, &authzv1.SelfSubjectAccessReview{Spec: authzv1.SelfSubjectAccessReviewSpec{
			ResourceAttributes: &authzv1.ResourceAttributes{Verb: p.Verb, Group: p.Group, Resource: p.Resource, Namespace: p.Namespace},
		}}, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("kube: cluster %q: checking permission to %s: %w", cluster, p, err)
		}
		if !res.Status.Allowed {
			missing = append(missing, p.String())
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("kube: cluster %q: meshca's credentials lack permission to %s; "+
			"grant them with RBAC (create tokenreviews is in the ClusterRole system:auth-delegator)",
			cluster, strings.Join(missing, ", "))
	}
	return nil
}
