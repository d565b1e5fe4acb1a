package admin_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/sds"
)

// Over TLS, callers are who their Kubernetes token says, and may do what
// RBAC grants them on meshca.io resources.
func TestKubeAuthorizerOverTLS(t *testing.T) {
	k := testenv.StartKube(t)
	ctx := context.Background()
	cs := k.Clientset()
	for name, verbs := range map[string][]string{"meshca-root-admin": {"get", "rotate"}, "meshca-root-viewer": {"get"}} {
		_, err := cs.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Rules:      []rbacv1.PolicyRule{{APIGroups: []string{admin.Group}, Resources: []string{"roots"}, Verbs: verbs}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
	}
	k.CreateServiceAccount(t, "ops", "admin")
	k.CreateServiceAccount(t, "ops", "viewer")
	k.Grant(t, "ops", "admin", "meshca-root-admin")
	k.Grant(t, "ops", "viewer", "meshca-root-viewer")

	auth := catest.NewAuthority(t, nil)
	ledger, err := audit.New(audit.Config{Dir: filepath.Join(t.TempDir(), "audit")})
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { _ = ledger.Run(sctx) }()
	defer ledger.Close()
	srv, err := sds.New(sds.Config{Source: sds.NewBroadcaster()})
	if err != nil {
		t.Fatal(err)
	}
	rot, err := rotation.New(rotation.Config{CA: auth, Proxies: srv, Ledger: rotation.LedgerFunc(
		func(context.Context, time.Time) ([]rotation.Holding, error) { return nil, nil })})
	if err != nil {
		t.Fatal(err)
	}
	a, err := admin.New(admin.Config{Routes: admin.RootRoutes(rot), Ledger: ledger,
		Remote: admin.KubeAuthorizer{Client: cs, Namespace: "meshca-system"}})
	if err != nil {
		t.Fatal(err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	issued, err := auth.IssueServing(ctx, key.Public(), spiffeid.RequireFromString("spiffe://cluster.local/ns/meshca-system/sa/meshca"),
		[]string{"localhost"}, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{PrivateKey: key}
	for _, c := range issued.Chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := tls.NewListener(tcp, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	done := make(chan error, 1)
	go func() { done <- a.Serve(sctx, l) }()
	defer func() { cancel(); <-done }()

	roots := x509.NewCertPool()
	for _, r := range auth.Issuer().Roots {
		roots.AddCert(r)
	}
	client := func(token string) *admin.Client {
		c, err := admin.NewRemoteClient("https://"+tcp.Addr().String(), roots, "localhost", func() (string, error) { return token, nil })
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	adminTok := k.Token(t, "ops", "admin", nil, time.Hour, nil)
	viewerTok := k.Token(t, "ops", "viewer", nil, time.Hour, nil)

	var st rotation.Status
	if err := client(viewerTok).Do(ctx, http.MethodGet, "/v1/roots", nil, &st); err != nil {
		t.Fatalf("viewer reading the status: %v", err)
	}
	var apiErr *admin.APIError
	err = client(viewerTok).Do(ctx, http.MethodPost, "/v1/roots/prepare", admin.StepRequest{}, nil)
	if !errors.As(err, &apiErr) || apiErr.HTTPStatus != http.StatusForbidden ||
		!strings.Contains(apiErr.Body.Error, "system:serviceaccount:ops:viewer may not rotate roots.meshca.io in namespace meshca-system") {
		t.Fatalf("viewer preparing a rotation: %v", err)
	}
	err = client("not-a-token").Do(ctx, http.MethodGet, "/v1/roots", nil, nil)
	if !errors.As(err, &apiErr) || apiErr.HTTPStatus != http.StatusUnauthorized {
		t.Fatalf("a forged token: %v", err)
	}
	if err := client(adminTok).Do(ctx, http.MethodPost, "/v1/roots/prepare", admin.StepRequest{}, &st); err != nil {
		t.Fatalf("admin preparing a rotation: %v", err)
	}
	if st.Phase != "prepared" {
		t.Errorf("phase after prepare: %s", st.Phase)
	}

	var denied, ok int
	for _, r := range adminRecords(t, ledger) {
		switch {
		case r.Result == "denied" && r.Actor == "kube:system:serviceaccount:ops:viewer":
			denied++
		case r.Result == "ok" && r.Actor == "kube:system:serviceaccount:ops:admin" && r.Action == "roots.rotate":
			ok++
		}
	}
	if denied != 1 || ok != 1 {
		t.Errorf("admin records: %d denials of the viewer, %d successful rotations by the admin; want 1 and 1", denied, ok)
	}
}
