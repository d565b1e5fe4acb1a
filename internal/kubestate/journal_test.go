package kubestate_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/kubestate"
	"github.com/meshca/meshca/internal/testenv"
)

const ns = "meshca-system"

func newJournal(t *testing.T, client kubernetes.Interface, name string) *kubestate.SecretJournal {
	t.Helper()
	j, err := kubestate.NewSecretJournal(kubestate.Config{Client: client, Namespace: ns, Name: name})
	if err != nil {
		t.Fatal(err)
	}
	return j
}

func mustSave(t *testing.T, j *kubestate.SecretJournal, data, rev string) string {
	t.Helper()
	next, err := j.Save(t.Context(), []byte(data), rev)
	if err != nil {
		t.Fatalf("Save(%q, %q): %v", data, rev, err)
	}
	if next == "" || next == rev {
		t.Fatalf("Save(%q, %q) returned revision %q", data, rev, next)
	}
	return next
}

// assertStored checks what Load returns.
func assertStored(t *testing.T, j *kubestate.SecretJournal, data, rev string) {
	t.Helper()
	got, gotRev, err := j.Load(t.Context())
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if string(got) != data || gotRev != rev {
		t.Fatalf("Load = %q at %q, want %q at %q", got, gotRev, data, rev)
	}
}

func assertConflict(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, ca.ErrJournalConflict) {
		t.Fatalf("%s: error %v, want ca.ErrJournalConflict", what, err)
	}
}

func getSecret(t *testing.T, client kubernetes.Interface, name string) *corev1.Secret {
	t.Helper()
	s, err := client.CoreV1().Secrets(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSecretJournalAgainstAPIServer(t *testing.T) {
	env := testenv.StartKube(t)
	client := env.Clientset()
	env.CreateNamespace(t, ns)

	t.Run("MissingIsNotExist", func(t *testing.T) {
		j := newJournal(t, client, "missing")
		if _, rev, err := j.Load(t.Context()); !errors.Is(err, fs.ErrNotExist) || rev != "" {
			t.Fatalf("Load = rev %q, %v; want fs.ErrNotExist", rev, err)
		}
		_, err := j.Save(t.Context(), []byte("v1"), "123")
		assertConflict(t, "Save from a revision of a Secret that does not exist", err)
		if _, err := client.CoreV1().Secrets(ns).Get(t.Context(), "missing", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Fatalf("after a conflicting Save the Secret exists (err %v)", err)
		}
	})

	t.Run("CreateThenUpdate", func(t *testing.T) {
		j := newJournal(t, client, "create")
		rev1 := mustSave(t, j, "v1", "")
		assertStored(t, j, "v1", rev1)
		s := getSecret(t, client, "create")
		if s.Type != corev1.SecretTypeOpaque || s.Labels["app.kubernetes.io/name"] != "meshca" || s.Labels["app.kubernetes.io/component"] != "ca-journal" {
			t.Errorf("created Secret: type %q, labels %v", s.Type, s.Labels)
		}
		if got := string(s.Data[kubestate.DefaultKey]); got != "v1" {
			t.Errorf("Secret key %s holds %q", kubestate.DefaultKey, got)
		}
		rev2 := mustSave(t, j, "v2", rev1)
		assertStored(t, j, "v2", rev2)
	})

	t.Run("StaleRevisionConflictsAndWritesNothing", func(t *testing.T) {
		j := newJournal(t, client, "stale")
		rev1 := mustSave(t, j, "v1", "")
		rev2 := mustSave(t, j, "v2", rev1)
		_, err := j.Save(t.Context(), []byte("v3"), rev1)
		assertConflict(t, "Save from the previous revision", err)
		_, err = j.Save(t.Context(), []byte("v3"), "")
		assertConflict(t, "create over a stored journal", err)
		assertStored(t, j, "v2", rev2) // the revision is unchanged: nothing was written
	})

	t.Run("DeletedSecretConflicts", func(t *testing.T) {
		j := newJournal(t, client, "deleted")
		rev1 := mustSave(t, j, "v1", "")
		if err := client.CoreV1().Secrets(ns).Delete(t.Context(), "deleted", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		_, err := j.Save(t.Context(), []byte("v2"), rev1)
		assertConflict(t, "Save after the Secret was deleted", err)
		if _, _, err := j.Load(t.Context()); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("Load after a conflicting Save: %v, want fs.ErrNotExist", err)
		}
	})

	t.Run("ConcurrentCreatorsOneWins", func(t *testing.T) {
		j := newJournal(t, client, "race-create")
		race(t, j, "")
	})

	t.Run("ConcurrentWritersFromSameRevisionOneWins", func(t *testing.T) {
		j := newJournal(t, client, "race-update")
		rev := mustSave(t, j, "v0", "")
		for range 3 {
			rev = race(t, j, rev)
		}
	})

	t.Run("PreCreatedSecretNeedsOnlyGetAndUpdate", func(t *testing.T) {
		const name, sa = "shipped", "meshca-server"
		// As an installation would ship it: empty, with its own metadata.
		_, err := client.CoreV1().Secrets(ns).Create(t.Context(), &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{
				Name:        name,
				Labels:      map[string]string{"app.kubernetes.io/managed-by": "Helm"},
				Annotations: map[string]string{"meta.helm.sh/release-name": "meshca"},
			},
			Data: map[string][]byte{"other": []byte("kept")},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		env.CreateServiceAccount(t, ns, sa)
		grantSecret(t, client, sa, name, "get", "update")
		scoped, err := kubernetes.NewForConfig(env.ConfigFor(t, ns, sa))
		if err != nil {
			t.Fatal(err)
		}

		j := newJournal(t, scoped, name)
		// The API server's RBAC cache takes a moment to see new grants.
		testenv.Eventually(t, "Load of the empty Secret is fs.ErrNotExist", func() error {
			if _, _, err := j.Load(t.Context()); !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("Load: %v", err)
			}
			return nil
		})
		rev1 := mustSave(t, j, "v1", "")
		assertStored(t, j, "v1", rev1)
		rev2 := mustSave(t, j, "v2", rev1)
		assertStored(t, j, "v2", rev2)
		s := getSecret(t, client, name)
		if string(s.Data["other"]) != "kept" || s.Annotations["meta.helm.sh/release-name"] != "meshca" ||
			s.Labels["app.kubernetes.io/managed-by"] != "Helm" || s.Labels["app.kubernetes.io/component"] != "ca-journal" {
			t.Errorf("the Secret's own content was not kept: data keys %d, labels %v, annotations %v", len(s.Data), s.Labels, s.Annotations)
		}

		// The grant really is that narrow: another Secret is out of reach.
		other := newJournal(t, scoped, "not-granted")
		if _, err := other.Save(t.Context(), []byte("v1"), ""); !apierrors.IsForbidden(err) {
			t.Fatalf("Save of a Secret outside the grant: %v, want forbidden", err)
		}
	})
}

// race has writers save concurrently from rev and checks that exactly one
// wins, the others conflict, and the winner's journal is stored. It
// returns the winner's revision.
func race(t *testing.T, j *kubestate.SecretJournal, rev string) string {
	t.Helper()
	const writers = 8
	var wg sync.WaitGroup
	revs := make([]string, writers)
	errs := make([]error, writers)
	start := make(chan struct{})
	for i := range writers {
		wg.Go(func() {
			<-start
			revs[i], errs[i] = j.Save(context.Background(), fmt.Appendf(nil, "writer %d from %q", i, rev), rev)
		})
	}
	close(start)
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil && winner >= 0:
			t.Fatalf("writers %d and %d both won from %q", winner, i, rev)
		case err == nil:
			winner = i
		default:
			assertConflict(t, fmt.Sprintf("writer %d", i), err)
		}
	}
	if winner < 0 {
		t.Fatalf("no writer won from %q", rev)
	}
	data, got, err := j.Load(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Appendf(nil, "writer %d from %q", winner, rev); !bytes.Equal(data, want) || got != revs[winner] {
		t.Fatalf("Load = %q at %q, want the winner's %q at %q", data, got, want, revs[winner])
	}
	return got
}

// grantSecret lets service account sa do verbs on the one Secret name.
func grantSecret(t *testing.T, client kubernetes.Interface, sa, name string, verbs ...string) {
	t.Helper()
	role := &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "journal-" + name},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{name}, Verbs: verbs}},
	}
	if _, err := client.RbacV1().Roles(ns).Create(t.Context(), role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "journal-" + name},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: sa}},
	}
	if _, err := client.RbacV1().RoleBindings(ns).Create(t.Context(), binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestNewSecretJournalNeedsClientAndNamespace(t *testing.T) {
	if _, err := kubestate.NewSecretJournal(kubestate.Config{Namespace: ns}); err == nil {
		t.Error("no client: no error")
	}
	client, err := kubernetes.NewForConfig(&rest.Config{Host: "https://127.0.0.1:1"}) // never called
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kubestate.NewSecretJournal(kubestate.Config{Client: client}); err == nil {
		t.Error("no namespace: no error")
	}
}
