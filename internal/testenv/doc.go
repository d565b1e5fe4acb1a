// Package testenv runs a real kube-apiserver backed by a real etcd for tests
// that talk to Kubernetes (TokenReview, TokenRequest, RBAC), so that they
// exercise the apiserver's own authentication and validation rather than a
// fake that agrees with our assumptions.
//
// The binaries are built from versions pinned in tools/kube by
// hack/testenv.sh and cached outside the repository; `make test` builds them
// first and exports MESHCA_KUBE_BIN_DIR. Without that variable StartKube runs
// the script itself (a cold build takes about 3.5 minutes). A missing or broken
// environment fails the test: it never skips, because a skipped
// Kubernetes test looks exactly like a passing one in CI.
//
// Only the apiserver and etcd run: no controller-manager, scheduler or
// kubelet. Namespaces and service accounts do not appear by themselves (not
// even "default"), and pods stay Pending forever, which is enough to bind
// tokens to them. The apiserver caches successful token authentications for
// about 10 s, so tests of revocation must poll rather than expect an
// immediate change.
//
// Use it only from tests; it must not import k8s.io/kubernetes.
package testenv
