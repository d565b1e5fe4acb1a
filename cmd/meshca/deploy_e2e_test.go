package main

import (
	"crypto/x509"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/meshca/meshca/deploy"
	"github.com/meshca/meshca/internal/kubestate"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/internal/vaulttest"
)

// deploymentArgs returns the meshca container's args of the rendered
// Deployment, with the listen addresses and paths that name the pod's
// ports and volumes replaced by repl.
func deploymentArgs(t *testing.T, objs []*unstructured.Unstructured, repl map[string]string) []string {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() != "Deployment" {
			continue
		}
		containers, _, err := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
		if err != nil || len(containers) != 1 {
			t.Fatalf("Deployment %s: %d containers, %v", o.GetName(), len(containers), err)
		}
		raw, _, _ := unstructured.NestedStringSlice(containers[0].(map[string]any), "args")
		if len(raw) == 0 || raw[0] != "server" {
			t.Fatalf("Deployment %s runs %q, want meshca server", o.GetName(), raw)
		}
		var args []string
		seen := map[string]bool{}
		for _, a := range raw[1:] {
			name, _, _ := strings.Cut(a, "=")
			if v, ok := repl[name]; ok {
				a, seen[name] = name+"="+v, true
			}
			args = append(args, a)
		}
		for name := range repl {
			if !seen[name] {
				t.Fatalf("the Deployment's args %q have no %s", raw, name)
			}
		}
		return args
	}
	t.Fatal("no Deployment in the manifests")
	return nil
}

// install applies the cluster-scoped and namespace objects of the
// kustomization dir for real (everything but the Deployment, Service and
// PDB, which need a kubelet and controllers), then runs `meshca server`
// with the Deployment's args, as the install's service account; repl
// replaces the args that name the pod's ports and volumes.
func install(t *testing.T, env *testenv.Kube, dir string, repl map[string]string) (*serverProc, []string) {
	t.Helper()
	manifests, err := deploy.Render(dir)
	if err != nil {
		t.Fatal(err)
	}
	apply := env.Applier(t)
	objs := testenv.Objects(t, manifests)
	for _, o := range objs {
		switch o.GetKind() {
		case "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap":
			if err := apply.Apply(t.Context(), o, false); err != nil {
				t.Fatal(err)
			}
		}
	}
	repl["--grpc-addr"], repl["--monitor-addr"] = "127.0.0.1:0", "127.0.0.1:0"
	repl["--log-format"] = "text" // startServerProc reads the addresses from the text log
	repl["--data-dir"] = t.TempDir()
	args := deploymentArgs(t, objs, repl)
	kubeconfig := writeFile(t, "kubeconfig", env.KubeconfigFor(t, "meshca-system", "meshca"))
	srv := startServerProc(t, append(args, "--kubeconfig", kubeconfig)...)
	testenv.Eventually(t, "/readyz answers 200", func() error {
		_, err := fetch("http://"+srv.monitor+"/readyz", http.StatusOK)
		return err
	})
	if logs := strings.ToLower(srv.logs.String()); strings.Contains(logs, "forbidden") || strings.Contains(logs, "out of reach") {
		t.Errorf("the server met a permission it lacks:\n%s", srv.logs.String())
	}
	return srv, args
}

// publishedBundle waits for the leader's trust bundle ConfigMap and
// writes its roots to a file.
func publishedBundle(t *testing.T, env *testenv.Kube) (string, *x509.CertPool) {
	t.Helper()
	var rootPEM string
	testenv.Eventually(t, "the trust bundle is published", func() error {
		cm, err := env.Clientset().CoreV1().ConfigMaps("meshca-system").Get(t.Context(), kubestate.DefaultBundleName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		rootPEM = cm.Data[kubestate.DefaultBundleKey]
		return nil
	})
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(rootPEM)) {
		t.Fatalf("the published bundle holds no certificate: %q", rootPEM)
	}
	return writeFile(t, "root-cert.pem", []byte(rootPEM)), roots
}

// workloadCert gets a certificate for demo/web from srv, trusting only
// bundle, and checks it chains to roots.
func workloadCert(t *testing.T, env *testenv.Kube, srv *serverProc, bundle string, roots *x509.CertPool) {
	t.Helper()
	env.CreateServiceAccount(t, "demo", "web")
	token := writeFile(t, "web.token", []byte(env.Token(t, "demo", "web", []string{"meshca"}, time.Hour, nil)))
	out := filepath.Join(t.TempDir(), "web")
	meshcaCmd(t, "cert", "--addr", srv.grpc, "--ca-bundle", bundle, "--token-file", token, "--out", out)
	svid, _ := loadSVID(t, out)
	if got := svid.ID.String(); got != "spiffe://cluster.local/ns/demo/sa/web" {
		t.Errorf("SPIFFE ID %s", got)
	}
	inter := x509.NewCertPool()
	for _, c := range svid.Certificates[1:] {
		inter.AddCert(c)
	}
	if _, err := svid.Certificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("the certificate does not chain to the published bundle: %v", err)
	}
}

// TestServerRunsAsTheDeploymentSays runs `meshca server` with the default
// install's args, as the install's service account, under the install's
// RBAC in a real API server: it passes its start-up permission check,
// elects itself, keeps its keys and journal in the two Secrets, publishes
// the trust bundle, issues to a workload that trusts only that published
// bundle, and serves its admin API to an operator bound to meshca-operator
// while refusing one who is not.
func TestServerRunsAsTheDeploymentSays(t *testing.T) {
	const ns = "meshca-system"
	env := testenv.StartKube(t)
	adminAddr := freeAddr(t)
	srv, args := install(t, env, "base", map[string]string{
		"--admin-addr":               adminAddr,
		"--keystore-passphrase-file": writeFile(t, "passphrase", []byte("from a Secret of its own\n")),
	})
	testenv.Eventually(t, "it leads", func() error {
		if v := testenv.ScrapedValue(t, "http://"+srv.monitor+"/metrics", "meshca_leader", nil); v != 1 {
			return fmt.Errorf("meshca_leader = %v", v)
		}
		return nil
	})
	cs := env.Clientset()
	lease, err := cs.CoordinationV1().Leases(ns).Get(t.Context(), "meshca-leader", metav1.GetOptions{})
	if err != nil || lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity == "" {
		t.Fatalf("Lease meshca-leader: %v %+v", err, lease)
	}
	for _, name := range []string{kubestate.DefaultName, kubestate.DefaultKeysName} {
		if _, err := cs.CoreV1().Secrets(ns).Get(t.Context(), name, metav1.GetOptions{}); err != nil {
			t.Errorf("Secret %s: %v", name, err)
		}
	}
	bundle, roots := publishedBundle(t, env)
	workloadCert(t, env, srv, bundle, roots)

	// The admin API over TLS: an operator bound to meshca-operator, and
	// one bound to nothing.
	env.CreateServiceAccount(t, "ops", "alice")
	env.CreateServiceAccount(t, "ops", "bob")
	_, err = cs.RbacV1().RoleBindings(ns).Create(t.Context(), &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "alice-meshca"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "meshca-operator"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "ops", Name: "alice"}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	adminCall := func(who string, args ...string) (string, string, error) {
		tok := writeFile(t, who+".token", []byte(env.Token(t, "ops", who, nil, time.Hour, nil)))
		return meshcaRun(append(args, "--server", "https://"+adminAddr, "--ca-bundle", bundle, "--token-file", tok)...)
	}
	status, errs, err := adminCall("alice", "root", "status")
	if err != nil || !strings.Contains(status, "phase    idle") {
		t.Errorf("alice: meshca root status: %v\n%s%s", err, status, errs)
	}
	mtls, errs, err := adminCall("alice", "mtls", "exclude", "add", "legacy.shop.svc.cluster.local")
	if err != nil {
		t.Errorf("alice: meshca mtls exclude add: %v\n%s%s", err, mtls, errs)
	}
	cm, err := cs.CoreV1().ConfigMaps(ns).Get(t.Context(), "meshca-mesh-policy", metav1.GetOptions{})
	if err != nil || !strings.Contains(cm.Data["mtlsExcludedServices"], "legacy.shop.svc.cluster.local") ||
		!strings.Contains(cm.Data["mtlsExcludedServices"], "kubernetes.default.svc.cluster.local") {
		t.Errorf("policy ConfigMap after the exclusion: %v %v", cm.Data, err)
	}
	_, errs, err = adminCall("bob", "root", "status")
	if err == nil || !strings.Contains(err.Error()+errs, "forbidden") {
		t.Errorf("bob, bound to nothing: meshca root status: %v %s, want forbidden", err, errs)
	}
	if !slices.Contains(args, "--remote-secrets=false") {
		t.Errorf("args %q read remote clusters from Secrets", args)
	}
}

// TestServerRunsAsTheVaultOverlaySays runs `meshca server` with the Vault
// overlay's args and environment, as the install's service account, against
// a real Vault whose Kubernetes auth method reviews the account's projected
// token (audience vault) with the real API server: the root key is created
// in Transit, no keys Secret is written, and workloads get certificates.
func TestServerRunsAsTheVaultOverlaySays(t *testing.T) {
	const ns = "meshca-system"
	env := testenv.StartKube(t)
	v := vaulttest.Start(t)
	v.EnableKubernetesAuth(t, env, "kubernetes")
	v.WritePolicy(t, "meshca-keys", vaulttest.KeysPolicy)
	v.KubernetesRole(t, "kubernetes", "meshca", map[string]any{
		"bound_service_account_names":      "meshca",
		"bound_service_account_namespaces": ns,
		"audience":                         "vault",
		"token_policies":                   "meshca-keys",
		"token_ttl":                        "1h",
	})
	// What the overlay's ConfigMap puts in the environment (vault.env),
	// pointed at this Vault.
	t.Setenv("VAULT_ADDR", v.Addr())
	t.Setenv("VAULT_CACERT", v.CAFile())
	env.CreateServiceAccount(t, ns, "meshca")
	vaultToken := writeFile(t, "token", []byte(env.Token(t, ns, "meshca", []string{"vault"}, 10*time.Minute, nil)))
	srv, _ := install(t, env, "overlays/vault", map[string]string{
		"--admin-addr":                  freeAddr(t),
		"--vault-kubernetes-token-file": vaultToken,
	})

	bundle, roots := publishedBundle(t, env)
	workloadCert(t, env, srv, bundle, roots)
	keys, err := v.Client().Logical().List("transit/keys")
	if err != nil || keys == nil {
		t.Fatalf("listing Transit keys: %v", err)
	}
	names, _ := keys.Data["keys"].([]any)
	if len(names) != 1 || !strings.HasPrefix(fmt.Sprint(names[0]), "meshca-root-") {
		t.Errorf("Transit keys %v, want the one root key", names)
	}
	if _, err := env.Clientset().CoreV1().Secrets(ns).Get(t.Context(), kubestate.DefaultKeysName, metav1.GetOptions{}); err == nil {
		t.Errorf("Secret %s written with the Vault keystore", kubestate.DefaultKeysName)
	}
}
