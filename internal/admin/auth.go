package admin

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// LocalAuthorizer admits callers on the Unix socket whose uid is the
// server's own or root's. The socket's file mode already keeps others out;
// this is the second lock, and it names the caller for the audit record.
type LocalAuthorizer struct{}

// Authorize implements Authorizer.
func (LocalAuthorizer) Authorize(r *http.Request, _ Action) (string, error) {
	uc, ok := ConnOf(r).(*net.UnixConn)
	if !ok {
		return "", fmt.Errorf("%w: not a Unix socket connection", ErrUnauthenticated)
	}
	cred, err := peerCred(uc)
	if err != nil {
		return "", fmt.Errorf("%w: reading the caller's credentials: %w", ErrUnauthenticated, err)
	}
	principal := fmt.Sprintf("unix:uid=%d,pid=%d", cred.Uid, cred.Pid)
	if self := os.Geteuid(); int(cred.Uid) != self && cred.Uid != 0 {
		return principal, fmt.Errorf("%w: uid %d is neither the server's (%d) nor root", ErrForbidden, cred.Uid, self)
	}
	return principal, nil
}

func peerCred(uc *net.UnixConn) (*unix.Ucred, error) {
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

// KubeAuthorizer authenticates a bearer token with TokenReview and
// authorises the action with a SubjectAccessReview: the caller needs the
// action's verb on its resource in the meshca.io group, in Namespace (an
// empty Namespace asks for a cluster-wide grant).
type KubeAuthorizer struct {
	Client    kubernetes.Interface
	Namespace string
	// Audiences the token must carry; empty means the apiserver's own,
	// which is what kubectl's credentials carry.
	Audiences []string
}

// Authorize implements Authorizer.
func (k KubeAuthorizer) Authorize(r *http.Request, a Action) (string, error) {
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || strings.TrimSpace(token) == "" {
		return "", fmt.Errorf("%w: no bearer token (send your Kubernetes credentials)", ErrUnauthenticated)
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	tr, err := k.Client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: strings.TrimSpace(token), Audiences: k.Audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("%w: TokenReview: %w", ErrUnavailable, err)
	}
	if !tr.Status.Authenticated {
		detail := tr.Status.Error
		if detail == "" {
			detail = "token not authenticated"
		}
		return "", fmt.Errorf("%w: %s", ErrUnauthenticated, detail)
	}
	u := tr.Status.User
	principal := "kube:" + u.Username
	extra := map[string]authorizationv1.ExtraValue{}
	for key, v := range u.Extra {
		extra[key] = authorizationv1.ExtraValue(v)
	}
	sar, err := k.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
		Spec: authorizationv1.SubjectAccessReviewSpec{
			User: u.Username, UID: u.UID, Groups: u.Groups, Extra: extra,
			ResourceAttributes: &authorizationv1.ResourceAttributes{
				Namespace: k.Namespace, Verb: a.Verb, Group: Group, Resource: a.Resource,
			},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return principal, fmt.Errorf("%w: SubjectAccessReview: %w", ErrUnavailable, err)
	}
	if !sar.Status.Allowed {
		where := "cluster-wide"
		if k.Namespace != "" {
			where = "in namespace " + k.Namespace
		}
		msg := fmt.Sprintf("%s may not %s %s.%s %s", u.Username, a.Verb, a.Resource, Group, where)
		if sar.Status.Reason != "" {
			msg += ": " + sar.Status.Reason
		}
		return principal, fmt.Errorf("%w: %s", ErrForbidden, msg)
	}
	return principal, nil
}
