package main

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/kubestate"
	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/keystore/disk"
)

// TestServerWithSecretKeystore runs two `meshca server` replicas that share
// nothing on disk: the CA's keys are in one Secret, encrypted as the disk
// keystore encrypts them, and the journal in another. The second replica
// signs its own intermediate with the root key the first created.
func TestServerWithSecretKeystore(t *testing.T) {
	const ns = "meshca-system"
	env := testenv.StartKube(t)
	env.CreateNamespace(t, ns)
	env.CreateServiceAccount(t, "shop", "cart")
	pass := writeFile(t, "pass", []byte("correct horse battery staple\n"))
	replica := func() (*serverProc, string) {
		dir := t.TempDir()
		return startServerProc(t, "--data-dir", dir, "--authenticator", "kube", "--kubeconfig", env.Kubeconfig(),
			"--keystore", "secret", "--keystore-passphrase-file", pass, "--ca-journal", "secret",
			"--bundle-out", filepath.Join(dir, "bundle.pem")), dir
	}

	_, firstDir := replica()
	secrets := env.Clientset().CoreV1().Secrets(ns)
	js, err := secrets.Get(t.Context(), kubestate.DefaultName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var j ca.Journal
	if err := json.Unmarshal(js.Data[kubestate.DefaultKey], &j); err != nil || j.Current == nil {
		t.Fatalf("journal in the Secret: %v\n%s", err, js.Data[kubestate.DefaultKey])
	}
	if j.Current.IntermediateKeyID != "" {
		t.Errorf("the secret keystore defaulted to a shared intermediate (%s)", j.Current.IntermediateKeyID)
	}
	keys, err := secrets.Get(t.Context(), kubestate.DefaultKeysName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := keys.Data[j.Current.RootKeyID+".key"]; !ok || len(keys.Data) != 2 {
		t.Fatalf("secret %s holds %d entries, want keystore.json and %s.key", kubestate.DefaultKeysName, len(keys.Data), j.Current.RootKeyID)
	}
	// The Secret holds the root's key, in the disk keystore's format.
	files, err := kubestate.NewSecretFiles(kubestate.FilesConfig{Client: env.Clientset(), Namespace: ns})
	if err != nil {
		t.Fatal(err)
	}
	store, err := disk.New(disk.Config{Files: files, Passphrase: []byte("correct horse battery staple")})
	if err != nil {
		t.Fatal(err)
	}
	rootKey, err := store.GetKey(t.Context(), j.Current.RootKeyID)
	if err != nil {
		t.Fatal(err)
	}
	roots, err := ca.ParseCerts([]byte(j.Current.RootCertPEM))
	if err != nil || len(roots) != 1 {
		t.Fatalf("root in the journal: %d certificates, %v", len(roots), err)
	}
	if !roots[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(rootKey.Public()) {
		t.Fatal("the key in the Secret is not the root's")
	}

	second, secondDir := replica()
	tok := writeFile(t, "token", []byte(env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, nil)))
	out := filepath.Join(t.TempDir(), "cart")
	meshcaCmd(t, "cert", "--addr", second.grpc, "--ca-bundle", filepath.Join(secondDir, "bundle.pem"), "--token-file", tok, "--out", out)
	svid, _ := loadSVID(t, out)
	firstBundle, err := os.ReadFile(filepath.Join(firstDir, "bundle.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(firstBundle) {
		t.Fatal("the first replica's bundle holds no certificate")
	}
	if len(svid.Certificates) != 2 {
		t.Fatalf("chain of %d, want leaf and the second replica's intermediate", len(svid.Certificates))
	}
	inter := x509.NewCertPool()
	inter.AddCert(svid.Certificates[1])
	if _, err := svid.Certificates[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("the second replica's certificate does not chain to the first replica's root: %v", err)
	}
}
