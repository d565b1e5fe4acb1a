package deploy_test

import (
	"context"
	"fmt"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/meshca/meshca/deploy"
	"github.com/meshca/meshca/identity/kube"
	"github.com/meshca/meshca/internal/golden"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/testenv"
)

func render(t *testing.T, dir string) []byte {
	t.Helper()
	out, err := deploy.Render(dir)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestRenderedManifestsMatchGolden: what `kubectl kustomize` prints for
// each kustomization is reviewed as a whole in testdata/<last path
// element>.yaml; go test ./deploy -update rewrites it after an intended
// change.
func TestRenderedManifestsMatchGolden(t *testing.T) {
	for _, dir := range deploy.Kustomizations {
		t.Run(dir, func(t *testing.T) {
			golden.Check(t, path.Base(dir)+".yaml", render(t, dir))
		})
	}
}

// typed converts the objects of kind in a rendered stream.
func typed[T any](t *testing.T, objs []*unstructured.Unstructured, kind string) []*T {
	t.Helper()
	var out []*T
	for _, o := range objs {
		if o.GetKind() != kind {
			continue
		}
		v := new(T)
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, v); err != nil {
			t.Fatalf("%s %s: %v", kind, o.GetName(), err)
		}
		out = append(out, v)
	}
	return out
}

func one[T any](t *testing.T, objs []*unstructured.Unstructured, kind, name string) *T {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return typed[T](t, []*unstructured.Unstructured{o}, kind)[0]
		}
	}
	t.Fatalf("no %s %s in the manifests", kind, name)
	return nil
}

// TestServerManifestsFollowTheRules checks, on the default and the Vault
// install, what the rendered objects must be whatever else changes: replicas
// that can lose one, probes, requests, a locked-down pod, state shared
// through Secrets, and RBAC that reaches nothing cluster-wide beyond reviews
// and read access to pods and service accounts.
func TestServerManifestsFollowTheRules(t *testing.T) {
	for _, dir := range []string{"base", "overlays/vault"} {
		t.Run(dir, func(t *testing.T) {
			objs := testenv.Objects(t, render(t, dir))
			d := one[appsv1.Deployment](t, objs, "Deployment", "meshca")
			if r := d.Spec.Replicas; r == nil || *r < 2 {
				t.Errorf("replicas = %s, want 2 or more", fmtPtr(r))
			}
			pod := d.Spec.Template.Spec
			psc := pod.SecurityContext
			if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
				t.Error("pod does not set runAsNonRoot")
			}
			if psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
				t.Error("pod's seccomp profile is not RuntimeDefault")
			}
			if len(pod.Containers) != 1 {
				t.Fatalf("%d containers, want 1", len(pod.Containers))
			}
			c := pod.Containers[0]
			sc := c.SecurityContext
			if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				t.Error("root filesystem is not read-only")
			}
			if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Error("privilege escalation is not disallowed")
			}
			if sc == nil || sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
				t.Error("capabilities are not all dropped")
			}
			for probe, want := range map[string]struct {
				p    *corev1.Probe
				path string
			}{"liveness": {c.LivenessProbe, "/healthz"}, "readiness": {c.ReadinessProbe, "/readyz"}, "startup": {c.StartupProbe, "/healthz"}} {
				if want.p == nil || want.p.HTTPGet == nil || want.p.HTTPGet.Path != want.path || want.p.HTTPGet.Port.String() != "monitoring" {
					t.Errorf("%s probe = %+v, want GET %s on port monitoring", probe, want.p, want.path)
				}
			}
			if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.Name == "monitoring" && p.ContainerPort == 15014 }) {
				t.Errorf("no monitoring port 15014 among %+v", c.Ports)
			}
			if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
				t.Errorf("requests = %v, want cpu and memory", c.Resources.Requests)
			}
			for _, arg := range []string{"--ca-journal=secret", "--leader-election=lease", "--admin-addr=:15016", "--monitor-addr=:15014", "--grpc-addr=:15012"} {
				if !slices.Contains(c.Args, arg) {
					t.Errorf("args %q lack %s", c.Args, arg)
				}
			}
			wantKeystore := map[string]string{"base": "--keystore=secret", "overlays/vault": "--keystore=vault"}[dir]
			if !slices.Contains(c.Args, wantKeystore) {
				t.Errorf("args %q lack %s", c.Args, wantKeystore)
			}

			labels := d.Spec.Template.Labels
			pdb := one[policyv1.PodDisruptionBudget](t, objs, "PodDisruptionBudget", "meshca")
			if !selects(pdb.Spec.Selector.MatchLabels, labels) || pdb.Spec.MinAvailable == nil || pdb.Spec.MinAvailable.IntValue() < 1 {
				t.Errorf("PDB %+v does not keep a replica of pods labelled %v", pdb.Spec, labels)
			}
			svc := one[corev1.Service](t, objs, "Service", "meshca")
			if !selects(svc.Spec.Selector, labels) {
				t.Errorf("Service selects %v, pods are labelled %v", svc.Spec.Selector, labels)
			}
			if sa := one[corev1.ServiceAccount](t, objs, "ServiceAccount", "meshca"); pod.ServiceAccountName != sa.Name {
				t.Errorf("pod runs as %q", pod.ServiceAccountName)
			}

			// The policy ConfigMap reads, through meshca's own parser, as
			// off with the API server excluded.
			cm := one[corev1.ConfigMap](t, objs, "ConfigMap", "meshca-mesh-policy")
			if _, ok := cm.Data[policy.KeyEnabled]; !ok {
				t.Errorf("policy ConfigMap lacks %s", policy.KeyEnabled)
			}
			p, err := policy.ParseConfigMap(cm.Data)
			if err != nil {
				t.Fatalf("policy ConfigMap: %v", err)
			}
			if p.Enabled || !slices.Equal(p.Excluded, []string{"kubernetes.default.svc.cluster.local"}) {
				t.Errorf("policy = %+v, want off with kubernetes.default.svc.cluster.local excluded", p)
			}

			checkRBAC(t, objs)
		})
	}
}

func fmtPtr[T any](p *T) string {
	if p == nil {
		return "unset"
	}
	return fmt.Sprint(*p)
}

func selects(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// checkRBAC: cluster-wide, only reviews (create) and pods/service accounts
// (read); everything else only in meshca's namespace, Secrets and the
// Lease by name where the verb allows it.
func checkRBAC(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	allowed := map[string][]string{
		"authentication.k8s.io/tokenreviews":        {"create"},
		"authorization.k8s.io/subjectaccessreviews": {"create"},
		"/pods":            {"get", "list", "watch"},
		"/serviceaccounts": {"get", "list", "watch"},
	}
	for _, cr := range typed[rbacv1.ClusterRole](t, objs, "ClusterRole") {
		for _, r := range cr.Rules {
			for _, g := range r.APIGroups {
				for _, res := range r.Resources {
					verbs, ok := allowed[g+"/"+res]
					if !ok {
						t.Errorf("ClusterRole %s grants %s on %s/%s cluster-wide", cr.Name, r.Verbs, g, res)
						continue
					}
					for _, v := range r.Verbs {
						if !slices.Contains(verbs, v) {
							t.Errorf("ClusterRole %s grants %s on %s/%s", cr.Name, v, g, res)
						}
					}
				}
			}
		}
	}
	for _, role := range typed[rbacv1.Role](t, objs, "Role") {
		if role.Namespace != "meshca-system" {
			t.Errorf("Role %s is in namespace %q", role.Name, role.Namespace)
		}
		for _, r := range role.Rules {
			if slices.Contains(r.Resources, "secrets") && (slices.Contains(r.Verbs, "list") || slices.Contains(r.Verbs, "watch") ||
				slices.Contains(r.Verbs, "get") && len(r.ResourceNames) == 0) {
				t.Errorf("Role %s reads Secrets beyond meshca's own: %+v", role.Name, r)
			}
			if slices.Contains(r.Verbs, "*") || slices.Contains(r.Resources, "*") || slices.Contains(r.Verbs, "delete") {
				t.Errorf("Role %s: rule %+v is wider than meshca needs", role.Name, r)
			}
		}
	}
}

// TestSidecarExample: the agent proves the pod's identity with a
// projected token meant for meshca alone and short-lived, and shares the
// SDS socket with Envoy through an emptyDir nobody else mounts.
func TestSidecarExample(t *testing.T) {
	objs := testenv.Objects(t, render(t, "examples/sidecar"))
	d := one[appsv1.Deployment](t, objs, "Deployment", "web")
	pod := d.Spec.Template.Spec
	var agent *corev1.Container
	for i := range pod.InitContainers {
		if pod.InitContainers[i].Name == "meshca-agent" {
			agent = &pod.InitContainers[i]
		}
	}
	if agent == nil || agent.RestartPolicy == nil || *agent.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Fatalf("no meshca-agent native sidecar (init container with restartPolicy Always) in %+v", pod.InitContainers)
	}
	if len(agent.Args) == 0 || agent.Args[0] != "agent" {
		t.Fatalf("agent args = %q", agent.Args)
	}
	flagValue := func(name string) string {
		for _, a := range agent.Args {
			if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
				return v
			}
		}
		t.Fatalf("agent has no --%s", name)
		return ""
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v
	}
	mountOf := func(c *corev1.Container, path string) (corev1.VolumeMount, bool) {
		for _, m := range c.VolumeMounts {
			if strings.HasPrefix(path, m.MountPath+"/") {
				return m, true
			}
		}
		return corev1.VolumeMount{}, false
	}

	tokenMount, ok := mountOf(agent, flagValue("token-file"))
	if !ok {
		t.Fatalf("--token-file %s is on no volume", flagValue("token-file"))
	}
	src := volumes[tokenMount.Name].Projected
	if src == nil || len(src.Sources) != 1 || src.Sources[0].ServiceAccountToken == nil {
		t.Fatalf("token volume %s is not a projected service-account token", tokenMount.Name)
	}
	tok := src.Sources[0].ServiceAccountToken
	if tok.Audience != "meshca" || tok.ExpirationSeconds == nil || *tok.ExpirationSeconds > 3600 ||
		filepath.Join(tokenMount.MountPath, tok.Path) != flagValue("token-file") {
		t.Errorf("token = audience %q, expiry %v s, at %s; want audience meshca, at most an hour, at --token-file", tok.Audience, tok.ExpirationSeconds, tok.Path)
	}

	sdsMount, ok := mountOf(agent, flagValue("socket"))
	if !ok || volumes[sdsMount.Name].EmptyDir == nil {
		t.Fatalf("--socket %s is not on an emptyDir", flagValue("socket"))
	}
	var sharers []string
	for _, c := range pod.Containers {
		for _, m := range c.VolumeMounts {
			if m.Name == sdsMount.Name {
				sharers = append(sharers, c.Name)
			}
		}
	}
	if !slices.Equal(sharers, []string{"envoy"}) {
		t.Errorf("the SDS volume is shared with %v, want envoy alone", sharers)
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Error("the pod also mounts the default service-account token")
	}
}

// TestManifestsServerSideDryRun applies every rendered object to a real
// kube-apiserver with server-side dry-run: schema, defaulting, validation
// and admission run in full; nothing is stored. Pods made from the
// Deployments' templates are dry-run too, in namespaces that enforce the
// restricted Pod Security Standard.
func TestManifestsServerSideDryRun(t *testing.T) {
	kube := testenv.StartKube(t)
	a := kube.Applier(t)
	ctx := context.Background()

	var objs []*unstructured.Unstructured
	for _, dir := range deploy.Kustomizations {
		objs = append(objs, testenv.Objects(t, render(t, dir))...)
	}
	extra, err := deploy.Extra("mtls-plan-rbac.yaml")
	if err != nil {
		t.Fatal(err)
	}
	objs = append(objs, testenv.Objects(t, extra)...)

	// Namespaced objects need their namespace to exist, and a dry-run
	// namespace is never created: those are applied for real.
	for _, o := range objs {
		if o.GetKind() == "Namespace" {
			if err := a.Apply(ctx, o, false); err != nil {
				t.Fatal(err)
			}
		}
	}
	accepted := 0
	for _, o := range objs {
		if err := a.Apply(ctx, o, true); err != nil {
			t.Errorf("dry-run rejected: %v", err)
			continue
		}
		accepted++
	}
	t.Logf("%d objects accepted by server-side dry-run", accepted)

	deployments := typed[appsv1.Deployment](t, objs, "Deployment")
	if len(deployments) != 3 {
		t.Fatalf("%d Deployments, want 3 (default, vault, sidecar example)", len(deployments))
	}
	for _, d := range deployments {
		// The ServiceAccount admission plugin wants the pod's account.
		ns := d.Namespace
		if _, err := kube.Clientset().CoreV1().ServiceAccounts(ns).Get(ctx, d.Spec.Template.Spec.ServiceAccountName, metav1.GetOptions{}); err != nil {
			kube.CreateServiceAccount(t, ns, d.Spec.Template.Spec.ServiceAccountName)
		}
		if err := a.Apply(ctx, podOf(t, d, nil), true); err != nil {
			t.Errorf("pod of Deployment %s/%s: %v", ns, d.Name, err)
		}
	}

	// The dry-runs can fail: a replica count below zero, and a pod that
	// may escalate privileges in a restricted namespace, are refused.
	bad := deployments[0].DeepCopy()
	bad.Spec.Replicas = ptr.To(int32(-1))
	if err := a.Apply(ctx, toUnstructured(t, bad, "apps/v1", "Deployment"), true); err == nil || !strings.Contains(err.Error(), "replicas") {
		t.Errorf("a Deployment with -1 replicas: %v, want refused naming replicas", err)
	}
	err = a.Apply(ctx, podOf(t, deployments[0], func(p *corev1.PodSpec) {
		p.Containers[0].SecurityContext.AllowPrivilegeEscalation = ptr.To(true)
	}), true)
	if err == nil || !strings.Contains(err.Error(), "allowPrivilegeEscalation") {
		t.Errorf("a pod allowing privilege escalation in a restricted namespace: %v, want refused", err)
	}
}

// podOf is a Pod with d's template, changed by edit if given.
func podOf(t *testing.T, d *appsv1.Deployment, edit func(*corev1.PodSpec)) *unstructured.Unstructured {
	t.Helper()
	p := &corev1.Pod{ObjectMeta: d.Spec.Template.ObjectMeta, Spec: *d.Spec.Template.Spec.DeepCopy()}
	p.Name, p.Namespace = d.Name+"-dry-run", d.Namespace
	if edit != nil {
		edit(&p.Spec)
	}
	return toUnstructured(t, p, "v1", "Pod")
}

func toUnstructured(t *testing.T, obj any, apiVersion, kind string) *unstructured.Unstructured {
	t.Helper()
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion(apiVersion)
	u.SetKind(kind)
	unstructured.RemoveNestedField(u.Object, "status")
	unstructured.RemoveNestedField(u.Object, "metadata", "creationTimestamp")
	return u
}

// TestRBACAllowsWhatMeshcaDoesAndNoMore binds the default install's roles
// to its service account in a real API server, then asks as that account
// (SelfSubjectAccessReview): the start-up check of `meshca server` passes,
// every call meshca makes is allowed, and what it must not do is refused.
func TestRBACAllowsWhatMeshcaDoesAndNoMore(t *testing.T) {
	env := testenv.StartKube(t)
	a := env.Applier(t)
	ctx := context.Background()
	for _, o := range testenv.Objects(t, render(t, "base")) {
		switch o.GetKind() {
		case "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
			if err := a.Apply(ctx, o, false); err != nil {
				t.Fatal(err)
			}
		}
	}
	const ns = "meshca-system"
	client, err := kubernetes.NewForConfig(env.ConfigFor(t, ns, "meshca"))
	if err != nil {
		t.Fatal(err)
	}
	reviews := client.AuthorizationV1().SelfSubjectAccessReviews()

	// What the server checks before it starts.
	perms := kube.RequiredPermissions(true)
	for _, verb := range []string{"get", "list", "watch", "create", "update"} {
		perms = append(perms, kube.Permission{Verb: verb, Resource: "configmaps", Namespace: ns})
	}
	if err := kube.CheckAccess(ctx, reviews, "local", perms); err != nil {
		t.Fatalf("the start-up check fails with the install's RBAC: %v", err)
	}

	type check struct {
		verb, group, resource, ns, name string
	}
	can := func(c check) bool {
		t.Helper()
		res, err := reviews.Create(ctx, &authzv1.SelfSubjectAccessReview{Spec: authzv1.SelfSubjectAccessReviewSpec{
			ResourceAttributes: &authzv1.ResourceAttributes{Verb: c.verb, Group: c.group, Resource: c.resource, Namespace: c.ns, Name: c.name},
		}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return res.Status.Allowed
	}
	for _, c := range []check{
		{"create", "authorization.k8s.io", "subjectaccessreviews", "", ""},
		{"create", "coordination.k8s.io", "leases", ns, ""},
		{"get", "coordination.k8s.io", "leases", ns, "meshca-leader"},
		{"update", "coordination.k8s.io", "leases", ns, "meshca-leader"},
		{"create", "", "secrets", ns, ""},
		{"get", "", "secrets", ns, "meshca-ca-journal"},
		{"update", "", "secrets", ns, "meshca-ca-journal"},
		{"get", "", "secrets", ns, "meshca-ca-keys"},
		{"update", "", "secrets", ns, "meshca-ca-keys"},
	} {
		if !can(c) {
			t.Errorf("meshca may not %s %s %s/%s, which it needs", c.verb, c.resource, c.ns, c.name)
		}
	}
	for _, c := range []check{
		{"list", "", "secrets", "", ""},                          // every Secret in the cluster
		{"list", "", "secrets", ns, ""},                          // every Secret in its namespace
		{"get", "", "secrets", ns, "meshca-keystore-passphrase"}, // the passphrase is a file, not an API read
		{"get", "", "secrets", "kube-system", "meshca-ca-keys"},
		{"delete", "", "secrets", ns, "meshca-ca-keys"},
		{"update", "coordination.k8s.io", "leases", ns, "kube-controller-manager"},
		{"get", "", "configmaps", "kube-system", ""},
		{"update", "", "configmaps", "default", ""},
		{"create", "", "pods", ns, ""},
		{"update", "", "pods", "default", ""},
		{"create", "", "serviceaccounts/token", "default", ""},
		{"get", "", "nodes", "", ""},
		{"impersonate", "", "serviceaccounts", "", ""},
		{"update", "apps", "deployments", ns, "meshca"},
		{"create", "rbac.authorization.k8s.io", "rolebindings", ns, ""},
	} {
		if can(c) {
			t.Errorf("meshca may %s %s in %q (name %q): more than it needs", c.verb, c.resource, c.ns, c.name)
		}
	}
}
