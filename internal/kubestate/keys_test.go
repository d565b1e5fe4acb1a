package kubestate_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/internal/kubestate"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/keystore/disk"
	"github.com/meshca/meshca/keystore/keystoretest"
)

// cheapKDF keeps the tests fast; the metadata in the Secret records it.
var cheapKDF = disk.KDFParams{Time: 1, MemoryKiB: 64, Threads: 1}

var keysPassphrase = []byte("correct horse battery staple")

func secretFiles(t *testing.T, client kubernetes.Interface, name string) *kubestate.SecretFiles {
	t.Helper()
	f, err := kubestate.NewSecretFiles(kubestate.FilesConfig{Client: client, Namespace: ns, Name: name})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// openKeys opens a disk keystore in Secret name, as a replica would.
func openKeys(t *testing.T, client kubernetes.Interface, name string) *disk.Store {
	t.Helper()
	s, err := disk.New(disk.Config{Files: secretFiles(t, client, name), Passphrase: keysPassphrase, KDF: cheapKDF})
	if err != nil {
		t.Fatalf("opening the keystore in secret %s: %v", name, err)
	}
	return s
}

func generateKey(t *testing.T, s keystore.Store, id string, kt keystore.KeyType) crypto.Signer {
	t.Helper()
	signer, err := s.GenerateKey(t.Context(), id, kt)
	if err != nil {
		t.Fatalf("GenerateKey(%q): %v", id, err)
	}
	return signer
}

func getKey(t *testing.T, s keystore.Store, id string) crypto.Signer {
	t.Helper()
	signer, err := s.GetKey(t.Context(), id)
	if err != nil {
		t.Fatalf("GetKey(%q): %v", id, err)
	}
	return signer
}

// verifies signs with signer and checks the signature under pub.
func verifies(t *testing.T, signer crypto.Signer, pub crypto.PublicKey) {
	t.Helper()
	digest := sha256.Sum256([]byte("kubestate keys"))
	sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest[:], sig) {
			t.Fatal("ECDSA signature does not verify under the expected public key")
		}
	case *rsa.PublicKey:
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
			t.Fatalf("RSA signature does not verify under the expected public key: %v", err)
		}
	default:
		t.Fatalf("unexpected public key %T", pub)
	}
}

func samePublic(a, b crypto.Signer) bool {
	return a.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(b.Public())
}

func TestSecretKeystoreAgainstAPIServer(t *testing.T) {
	env := testenv.StartKube(t)
	client := env.Clientset()
	env.CreateNamespace(t, ns)

	t.Run("Conformance", func(t *testing.T) {
		var n atomic.Int64
		keystoretest.Run(t, func(t *testing.T) keystore.Store {
			return openKeys(t, client, fmt.Sprintf("conformance-%d", n.Add(1)))
		})
	})

	t.Run("SecretHoldsTheFormatLabelled", func(t *testing.T) {
		const name = "format"
		s := openKeys(t, client, name)
		generateKey(t, s, "root-1", keystore.ECDSAP256)
		sec := getSecret(t, client, name)
		if got := slices.Sorted(maps.Keys(sec.Data)); !slices.Equal(got, []string{"keystore.json", "root-1.key"}) {
			t.Errorf("secret data keys %q, want keystore.json and root-1.key", got)
		}
		if !bytes.Contains(sec.Data["keystore.json"], []byte(`"argon2id"`)) {
			t.Errorf("keystore.json does not record the KDF:\n%s", sec.Data["keystore.json"])
		}
		if sec.Labels["app.kubernetes.io/name"] != "meshca" || sec.Labels["app.kubernetes.io/component"] != "ca-keys" || sec.Type != "Opaque" {
			t.Errorf("secret type %q, labels %v", sec.Type, sec.Labels)
		}
	})

	t.Run("TwoReplicasShareKeys", func(t *testing.T) {
		const name = "replicas"
		// Both open the Secret before it exists: one creates the metadata,
		// the other adopts it.
		var (
			a, b       *disk.Store
			errA, errB error
			wg         sync.WaitGroup
		)
		open := func(s **disk.Store, err *error) {
			*s, *err = disk.New(disk.Config{Files: secretFiles(t, client, name), Passphrase: keysPassphrase, KDF: cheapKDF})
		}
		wg.Go(func() { open(&a, &errA) })
		wg.Go(func() { open(&b, &errB) })
		wg.Wait()
		if errA != nil || errB != nil {
			t.Fatalf("opening two replicas at once: %v, %v", errA, errB)
		}

		made := generateKey(t, a, "root-a", keystore.ECDSAP256)
		got := getKey(t, b, "root-a")
		verifies(t, made, got.Public())
		verifies(t, got, made.Public())

		// Replacement and deletion by one replica are what the other sees.
		replaced := generateKey(t, b, "root-a", keystore.ECDSAP384)
		if !samePublic(getKey(t, a, "root-a"), replaced) {
			t.Fatal("replica a serves the key replica b replaced")
		}
		if err := a.DeleteKey(t.Context(), "root-a"); err != nil {
			t.Fatal(err)
		}
		if _, err := b.GetKey(t.Context(), "root-a"); !errors.Is(err, keystore.ErrNotFound) {
			t.Fatalf("GetKey of a key the other replica deleted = %v, want keystore.ErrNotFound", err)
		}
	})

	t.Run("ConcurrentGenerateFromTwoReplicasLosesNone", func(t *testing.T) {
		const name = "concurrent"
		replicas := []*disk.Store{openKeys(t, client, name), openKeys(t, client, name)}
		const goroutines = 8
		made := make([]crypto.Signer, goroutines)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range goroutines {
			wg.Go(func() {
				<-start
				signer, err := replicas[i%2].GenerateKey(t.Context(), fmt.Sprintf("key-%d", i), keystore.ECDSAP256)
				if err != nil {
					t.Errorf("GenerateKey from replica %d: %v", i%2, err)
				}
				made[i] = signer
			})
		}
		close(start)
		wg.Wait()
		if t.Failed() {
			return
		}
		for _, r := range replicas {
			for i, want := range made {
				if got := getKey(t, r, fmt.Sprintf("key-%d", i)); !samePublic(got, want) {
					t.Fatalf("key-%d holds another key than was generated", i)
				}
			}
		}
	})

	t.Run("ConcurrentWritesOfOneSecretAllKept", func(t *testing.T) {
		// Straight at the Files, without the keystore's lock: eight writers
		// race on one Secret, so most writes conflict at least once.
		f := secretFiles(t, client, "files-race")
		const writers = 8
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range writers {
			wg.Go(func() {
				<-start
				if err := f.Write(t.Context(), fmt.Sprintf("f%d.key", i), fmt.Appendf(nil, "data %d", i)); err != nil {
					t.Errorf("Write %d: %v", i, err)
				}
			})
		}
		close(start)
		wg.Wait()
		for i := range writers {
			got, err := f.Read(t.Context(), fmt.Sprintf("f%d.key", i))
			if err != nil || string(got) != fmt.Sprintf("data %d", i) {
				t.Errorf("Read f%d.key = %q, %v", i, got, err)
			}
		}
		if _, err := f.Read(t.Context(), "missing.key"); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Read of a missing key = %v, want fs.ErrNotExist", err)
		}
		if err := f.Create(t.Context(), "f0.key", []byte("again")); !errors.Is(err, fs.ErrExist) {
			t.Errorf("Create over a stored key = %v, want fs.ErrExist", err)
		}
		if err := f.Remove(t.Context(), "missing.key"); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Remove of a missing key = %v, want fs.ErrNotExist", err)
		}
	})

	t.Run("WrongPassphrase", func(t *testing.T) {
		const name = "passphrase"
		generateKey(t, openKeys(t, client, name), "root", keystore.ECDSAP256)
		_, err := disk.New(disk.Config{Files: secretFiles(t, client, name), Passphrase: []byte("incorrect horse")})
		if !errors.Is(err, disk.ErrWrongPassphrase) {
			t.Fatalf("New with a wrong passphrase = %v, want disk.ErrWrongPassphrase", err)
		}
		if !strings.Contains(err.Error(), "secret "+ns+"/"+name) {
			t.Errorf("error %q does not name the Secret", err)
		}
	})

	t.Run("NarrowRBACSuffices", func(t *testing.T) {
		// What the deployment grants: create on Secrets in the namespace,
		// get and update on the one Secret; no list, no watch.
		const sa = "keys-replica"
		env.CreateServiceAccount(t, ns, sa)
		grantSecret(t, client, sa, kubestate.DefaultKeysName, "get", "update")
		grantCreateSecrets(t, client, sa)
		scoped, err := kubernetes.NewForConfig(env.ConfigFor(t, ns, sa))
		if err != nil {
			t.Fatal(err)
		}
		open := func() (*disk.Store, error) {
			f, err := kubestate.NewSecretFiles(kubestate.FilesConfig{Client: scoped, Namespace: ns}) // the default name
			if err != nil {
				return nil, err
			}
			return disk.New(disk.Config{Files: f, Passphrase: keysPassphrase, KDF: cheapKDF})
		}
		var first *disk.Store
		// The API server's RBAC cache takes a moment to see new grants.
		testenv.Eventually(t, "the scoped replica opens the keystore", func() (err error) {
			first, err = open()
			return err
		})
		made := generateKey(t, first, "root", keystore.ECDSAP256)
		second, err := open()
		if err != nil {
			t.Fatal(err)
		}
		verifies(t, getKey(t, second, "root"), made.Public())
		generateKey(t, second, "next", keystore.ECDSAP256)
		if err := second.DeleteKey(t.Context(), "root"); err != nil {
			t.Fatal(err)
		}
		getKey(t, first, "next")
		if _, ok := getSecret(t, client, kubestate.DefaultKeysName).Data["next.key"]; !ok {
			t.Error("the key is not in the default Secret " + kubestate.DefaultKeysName)
		}

		// The grant really is that narrow: another Secret is out of reach.
		if _, err := secretFiles(t, scoped, "not-granted").Read(t.Context(), "keystore.json"); !apierrors.IsForbidden(err) {
			t.Fatalf("Read of a Secret outside the grant: %v, want forbidden", err)
		}
	})

	t.Run("NoPlaintextKeyInTheSecret", func(t *testing.T) {
		const name = "plaintext"
		s := openKeys(t, client, name)
		for _, kt := range []keystore.KeyType{keystore.ECDSAP256, keystore.ECDSAP384, keystore.RSA2048} {
			generateKey(t, s, string(kt), kt)
		}
		sec := getSecret(t, client, name)
		if len(sec.Data) != 4 {
			t.Fatalf("secret holds %d keys, want metadata and 3 key files", len(sec.Data))
		}
		for k, v := range sec.Data {
			if at, ok := findPrivateKey(v); ok {
				t.Errorf("secret key %s holds a plaintext private key at byte %d", k, at)
			}
			if bytes.Contains(v, []byte("PRIVATE KEY")) {
				t.Errorf("secret key %s holds a PEM private key", k)
			}
		}
		// The check finds a plaintext key wherever one is.
		ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		rk, _ := rsa.GenerateKey(rand.Reader, 2048)
		pkcs8, _ := x509.MarshalPKCS8PrivateKey(ec)
		sec1, _ := x509.MarshalECPrivateKey(ec)
		for what, der := range map[string][]byte{"PKCS #8": pkcs8, "SEC 1": sec1, "PKCS #1": x509.MarshalPKCS1PrivateKey(rk)} {
			planted := slices.Concat([]byte(rand.Text()), der, []byte(rand.Text()))
			if _, ok := findPrivateKey(planted); !ok {
				t.Errorf("findPrivateKey misses a %s key among other bytes", what)
			}
		}
	})

	// Last: it stops the API server.
	t.Run("APIServerDownIsUnavailable", func(t *testing.T) {
		s := openKeys(t, client, "outage")
		made := generateKey(t, s, "root", keystore.ECDSAP256)
		env.Stop(t)
		if _, err := s.GetKey(t.Context(), "root"); !errors.Is(err, keystore.ErrUnavailable) {
			t.Errorf("GetKey with the API server down = %v, want keystore.ErrUnavailable", err)
		}
		if _, err := s.GenerateKey(t.Context(), "next", keystore.ECDSAP256); !errors.Is(err, keystore.ErrUnavailable) {
			t.Errorf("GenerateKey with the API server down = %v, want keystore.ErrUnavailable", err)
		}
		env.Start(t)
		testenv.Eventually(t, "GetKey once the API server is back", func() error {
			got, err := s.GetKey(t.Context(), "root")
			if err == nil && !samePublic(got, made) {
				return errors.New("another key")
			}
			return err
		})
	})
}

// grantCreateSecrets lets service account sa create Secrets in ns: RBAC
// cannot scope create to a name.
func grantCreateSecrets(t *testing.T, client kubernetes.Interface, sa string) {
	t.Helper()
	role := &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "create-secrets-" + sa},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create"}}},
	}
	if _, err := client.RbacV1().Roles(ns).Create(t.Context(), role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: role.Name},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: sa}},
	}
	if _, err := client.RbacV1().RoleBindings(ns).Create(t.Context(), binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func TestNewSecretFilesNeedsClientAndNamespace(t *testing.T) {
	if _, err := kubestate.NewSecretFiles(kubestate.FilesConfig{Namespace: ns}); err == nil {
		t.Error("no client: no error")
	}
	if _, err := kubestate.NewSecretFiles(kubestate.FilesConfig{Client: unreachableClient(t)}); err == nil {
		t.Error("no namespace: no error")
	}
}

// TestSecretFilesUnreachable: with no API server to answer, every call
// fails as keystore.ErrUnavailable, naming the Secret, and so does opening
// a keystore on it.
func TestSecretFilesUnreachable(t *testing.T) {
	f := secretFiles(t, unreachableClient(t), "keys")
	_, readErr := f.Read(t.Context(), "keystore.json")
	_, listErr := f.List(t.Context())
	_, newErr := disk.New(disk.Config{Files: f, Passphrase: keysPassphrase, KDF: cheapKDF})
	for what, err := range map[string]error{
		"Read":     readErr,
		"List":     listErr,
		"Write":    f.Write(t.Context(), "a.key", []byte("x")),
		"Create":   f.Create(t.Context(), "a.key", []byte("x")),
		"Remove":   f.Remove(t.Context(), "a.key"),
		"disk.New": newErr,
	} {
		if !errors.Is(err, keystore.ErrUnavailable) || !strings.Contains(err.Error(), "kubestate: ") || !strings.Contains(err.Error(), "secret "+ns+"/keys") {
			t.Errorf("%s = %v, want keystore.ErrUnavailable naming the Secret", what, err)
		}
	}
	// A name that cannot be a data key is refused before any call.
	if err := f.Write(t.Context(), "a/b", nil); err == nil || errors.Is(err, keystore.ErrUnavailable) || !strings.Contains(err.Error(), "cannot be a Secret key") {
		t.Errorf("Write of an invalid name = %v", err)
	}
}

// unreachableClient talks to a loopback port nobody listens on.
func unreachableClient(t *testing.T) kubernetes.Interface {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	client, err := kubernetes.NewForConfig(&rest.Config{Host: "https://" + addr})
	if err != nil {
		t.Fatal(err)
	}
	return client
}

// findPrivateKey looks for a DER private key (PKCS #8, SEC 1 or PKCS #1)
// starting at any byte of b.
func findPrivateKey(b []byte) (int, bool) {
	for i := range b {
		var v asn1.RawValue
		if _, err := asn1.Unmarshal(b[i:], &v); err != nil {
			continue
		}
		der := v.FullBytes
		_, err8 := x509.ParsePKCS8PrivateKey(der)
		_, errEC := x509.ParseECPrivateKey(der)
		_, err1 := x509.ParsePKCS1PrivateKey(der)
		if err8 == nil || errEC == nil || err1 == nil {
			return i, true
		}
	}
	return 0, false
}
