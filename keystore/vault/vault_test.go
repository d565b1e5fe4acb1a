package vault_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/internal/testenv"
	"github.com/meshca/meshca/internal/vaulttest"
	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/keystore/keystoretest"
	"github.com/meshca/meshca/keystore/vault"
)

// TestConformance runs the keystore suite against a real Vault, as a token
// that holds only the documented policy. Each store has its own key prefix,
// so each starts empty.
func TestConformance(t *testing.T) {
	v := vaulttest.Start(t)
	token := v.KeysToken(t, api.TokenCreateRequest{})
	var n atomic.Int64
	keystoretest.Run(t, func(t *testing.T) keystore.Store {
		cfg := config(v, vault.TokenAuth{Token: token})
		cfg.KeyPrefix = fmt.Sprintf("meshca-%d-", n.Add(1))
		return newStore(t, cfg)
	})
}

// TestKeysNeverLeaveVault checks the key as Vault holds it: not exportable,
// no plaintext backup, and Vault refuses to export or back it up even to
// root.
func TestKeysNeverLeaveVault(t *testing.T) {
	v := vaulttest.Start(t)
	s := newStore(t, config(v, vault.TokenAuth{Token: v.KeysToken(t, api.TokenCreateRequest{})}))
	for _, kt := range []keystore.KeyType{keystore.ECDSAP256, keystore.RSA2048} {
		t.Run(string(kt), func(t *testing.T) {
			if _, err := s.GenerateKey(t.Context(), "root", kt); err != nil {
				t.Fatalf("GenerateKey: %v", err)
			}
			name := "meshca-root." + string(kt)
			info := v.Read(t, "transit/keys/"+name)
			if info == nil {
				t.Fatalf("no Transit key %s", name)
			}
			for _, field := range []string{"exportable", "allow_plaintext_backup"} {
				if info.Data[field] != false {
					t.Errorf("%s: %s = %v, want false", name, field, info.Data[field])
				}
			}
			for _, tt := range []struct{ path, refusal string }{
				{"transit/export/signing-key/" + name, "not exportable"},
				{"transit/export/signing-key/" + name + "/latest", "not exportable"},
				{"transit/backup/" + name, "exporting is disallowed"},
			} {
				secret, err := v.Client().Logical().ReadWithContext(t.Context(), tt.path)
				var re *api.ResponseError
				if !errors.As(err, &re) || !strings.Contains(strings.Join(re.Errors, " "), tt.refusal) {
					t.Errorf("root reading %s = (%v, %v), want Vault to refuse: %s", tt.path, secret, err, tt.refusal)
				}
			}
		})
	}
}

// TestGenerateKeyPinsVersion shows what replacing a key of the same type
// does in Transit: a rotation. The old signer keeps its own version, so it
// still signs with the old key, while GetKey returns the new one.
func TestGenerateKeyPinsVersion(t *testing.T) {
	v := vaulttest.Start(t)
	s := newStore(t, config(v, vault.TokenAuth{Token: v.RootToken()}))
	old := generate(t, s, "ca")
	replacement := generate(t, s, "ca")
	if replacement.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(old.Public()) {
		t.Fatal("GenerateKey over an existing key returned the same key")
	}
	info := v.Read(t, "transit/keys/meshca-ca.ecdsa-p256")
	if got := fmt.Sprint(info.Data["latest_version"]); got != "2" {
		t.Fatalf("latest_version = %s after two GenerateKey calls, want 2 (one rotation)", got)
	}
	for name, signer := range map[string]crypto.Signer{"old": old, "replacement": replacement} {
		if err := signVerify(signer, "pinned"); err != nil {
			t.Errorf("%s signer: %v", name, err)
		}
	}
	got, err := s.GetKey(t.Context(), "ca")
	if err != nil {
		t.Fatalf("GetKey: %v", err)
	}
	if !got.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(replacement.Public()) {
		t.Fatal("GetKey did not return the replacement")
	}
}

// TestCertificateChain signs a CA certificate and a leaf through Vault and
// verifies the chain with crypto/x509, for each signature scheme a CA uses.
func TestCertificateChain(t *testing.T) {
	v := vaulttest.Start(t)
	s := newStore(t, config(v, vault.TokenAuth{Token: v.RootToken()}))
	leafKey, err := keystore.Generate(keystore.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		kt  keystore.KeyType
		alg x509.SignatureAlgorithm
	}{
		{keystore.ECDSAP256, x509.ECDSAWithSHA256},
		{keystore.ECDSAP384, x509.ECDSAWithSHA384},
		{keystore.RSA2048, x509.SHA256WithRSA},
		{keystore.RSA2048, x509.SHA384WithRSAPSS},
	} {
		t.Run(fmt.Sprintf("%s_%v", tt.kt, tt.alg), func(t *testing.T) {
			caKey, err := s.GenerateKey(t.Context(), "chain-"+string(tt.kt), tt.kt)
			if err != nil {
				t.Fatalf("GenerateKey: %v", err)
			}
			now := time.Now()
			caTmpl := &x509.Certificate{
				SerialNumber:          big.NewInt(1),
				Subject:               pkix.Name{CommonName: "vault test root"},
				NotBefore:             now.Add(-time.Minute),
				NotAfter:              now.Add(time.Hour),
				IsCA:                  true,
				BasicConstraintsValid: true,
				KeyUsage:              x509.KeyUsageCertSign,
				SignatureAlgorithm:    tt.alg,
			}
			caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
			if err != nil {
				t.Fatalf("creating the CA certificate: %v", err)
			}
			ca, err := x509.ParseCertificate(caDER)
			if err != nil {
				t.Fatal(err)
			}
			leafTmpl := &x509.Certificate{
				SerialNumber:       big.NewInt(2),
				Subject:            pkix.Name{CommonName: "workload"},
				NotBefore:          now.Add(-time.Minute),
				NotAfter:           now.Add(30 * time.Minute),
				KeyUsage:           x509.KeyUsageDigitalSignature,
				ExtKeyUsage:        []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
				SignatureAlgorithm: tt.alg,
			}
			leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, leafKey.Public(), caKey)
			if err != nil {
				t.Fatalf("creating the leaf certificate: %v", err)
			}
			leaf, err := x509.ParseCertificate(leafDER)
			if err != nil {
				t.Fatal(err)
			}
			roots := x509.NewCertPool()
			roots.AddCert(ca)
			if _, err := leaf.Verify(x509.VerifyOptions{
				Roots:       roots,
				CurrentTime: now,
				KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			}); err != nil {
				t.Fatalf("leaf signed through Vault does not verify: %v", err)
			}
		})
	}
}

// TestExportableKeyRefused plants an exportable key under a name meshca
// would use: the store must neither use nor rotate it.
func TestExportableKeyRefused(t *testing.T) {
	v := vaulttest.Start(t)
	v.Write(t, "transit/keys/meshca-planted.ecdsa-p256", map[string]any{"type": "ecdsa-p256", "exportable": true})
	s := newStore(t, config(v, vault.TokenAuth{Token: v.RootToken()}))
	if _, err := s.GetKey(t.Context(), "planted"); !errors.Is(err, vault.ErrExportable) {
		t.Errorf("GetKey = %v, want ErrExportable", err)
	}
	if _, err := s.GenerateKey(t.Context(), "planted", keystore.ECDSAP256); !errors.Is(err, vault.ErrExportable) {
		t.Errorf("GenerateKey = %v, want ErrExportable", err)
	}
	if got := fmt.Sprint(v.Read(t, "transit/keys/meshca-planted.ecdsa-p256").Data["latest_version"]); got != "1" {
		t.Errorf("latest_version = %s, want 1: the exportable key was rotated", got)
	}
}

// TestPermissionDenied uses a token that may sign but not create keys.
func TestPermissionDenied(t *testing.T) {
	v := vaulttest.Start(t)
	root := newStore(t, config(v, vault.TokenAuth{Token: v.RootToken()}))
	generate(t, root, "ca")
	v.WritePolicy(t, "sign-only", signOnlyPolicy)
	token := v.CreateToken(t, &api.TokenCreateRequest{Policies: []string{"sign-only"}, NoDefaultPolicy: true})
	s := newStore(t, config(v, vault.TokenAuth{Token: token}))

	signer, err := s.GetKey(t.Context(), "ca")
	if err != nil {
		t.Fatalf("GetKey with read access: %v", err)
	}
	if err := signVerify(signer, "allowed"); err != nil {
		t.Fatalf("signing with sign access: %v", err)
	}
	_, err = s.GenerateKey(t.Context(), "ca", keystore.ECDSAP256)
	if !errors.Is(err, vault.ErrPermissionDenied) {
		t.Fatalf("GenerateKey without create/update = %v, want ErrPermissionDenied", err)
	}
	if !strings.HasPrefix(err.Error(), "keystore/vault: ") {
		t.Errorf("error %q lacks the package prefix", err)
	}
	// Vault refuses a revoked token outright, whatever its policies were.
	if err := v.Client().Auth().Token().RevokeTreeWithContext(t.Context(), token); err != nil {
		t.Fatalf("revoking: %v", err)
	}
	if err := signVerify(signer, "revoked"); !errors.Is(err, vault.ErrLoginRefused) {
		t.Fatalf("signing with a revoked token = %v, want ErrLoginRefused", err)
	}
}

// TestSignMetrics counts signatures and refuses digests the store cannot
// sign before asking Vault.
func TestSignMetrics(t *testing.T) {
	v := vaulttest.Start(t)
	reg := prometheus.NewRegistry()
	cfg := config(v, vault.TokenAuth{Token: v.RootToken()})
	cfg.Metrics = vault.NewMetrics(reg)
	s := newStore(t, cfg)
	signer := generate(t, s, "ca")
	for i := range 3 {
		if err := signVerify(signer, fmt.Sprint(i)); err != nil {
			t.Fatal(err)
		}
	}
	sum1 := sha1.Sum([]byte("x"))
	if _, err := signer.Sign(nil, sum1[:], crypto.SHA1); err == nil {
		t.Error("signing a SHA-1 digest succeeded")
	}
	short := sha256.Sum224([]byte("x"))
	if _, err := signer.Sign(nil, short[:], crypto.SHA256); err == nil {
		t.Error("signing a digest of the wrong length succeeded")
	}
	if got := testenv.GatheredValue(t, reg, "meshca_vault_sign_requests_total", map[string]string{"result": "ok"}); got != 3 {
		t.Errorf("sign requests ok = %v, want 3", got)
	}
	if got := testenv.GatheredValue(t, reg, "meshca_vault_sign_duration_seconds", nil); got != 3 {
		t.Errorf("sign latency samples = %v, want 3", got)
	}
}

// TestNew checks configuration before anything is contacted.
func TestNew(t *testing.T) {
	token := vault.TokenAuth{Token: "t"}
	for _, tt := range []struct {
		name string
		cfg  vault.Config
		ok   bool
	}{
		{"https", vault.Config{Address: "https://vault.example:8200", Auth: token}, true},
		{"http to loopback", vault.Config{Address: "http://127.0.0.1:8200", Auth: token}, true},
		{"http to localhost", vault.Config{Address: "http://localhost:8200", Auth: token}, true},
		{"http to a remote host", vault.Config{Address: "http://vault.example:8200", Auth: token}, false},
		{"no address", vault.Config{Auth: token}, false},
		{"other scheme", vault.Config{Address: "ftp://vault.example", Auth: token}, false},
		{"no auth", vault.Config{Address: "https://vault.example"}, false},
		{"empty token", vault.Config{Address: "https://vault.example", Auth: vault.TokenAuth{}}, false},
		{"approle without secret ID", vault.Config{Address: "https://vault.example", Auth: vault.AppRoleAuth{RoleID: "r"}}, false},
		{"kubernetes without role", vault.Config{Address: "https://vault.example", Auth: vault.KubernetesAuth{}}, false},
		{"auth by pointer", vault.Config{Address: "https://vault.example", Auth: &vault.AppRoleAuth{RoleID: "r", SecretIDFile: "f"}}, true},
		{"nil auth pointer", vault.Config{Address: "https://vault.example", Auth: (*vault.TokenAuth)(nil)}, false},
		{"prefix", vault.Config{Address: "https://vault.example", Auth: token, KeyPrefix: "ca_1.x-"}, true},
		{"prefix starting with a dot", vault.Config{Address: "https://vault.example", Auth: token, KeyPrefix: ".x"}, false},
		{"prefix with a slash", vault.Config{Address: "https://vault.example", Auth: token, KeyPrefix: "a/b"}, false},
		{"missing CA file", vault.Config{Address: "https://vault.example", Auth: token, TLS: vault.TLSConfig{CAFile: "/nonexistent/ca.pem"}}, false},
		{"negative timeout", vault.Config{Address: "https://vault.example", Auth: token, RequestTimeout: -time.Second}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := vault.New(tt.cfg)
			if tt.ok && err != nil {
				t.Fatalf("New: %v", err)
			}
			if !tt.ok {
				if err == nil {
					t.Fatal("New accepted the configuration")
				}
				if !strings.HasPrefix(err.Error(), "keystore/vault: ") {
					t.Errorf("error %q lacks the package prefix", err)
				}
			}
		})
	}
}

// TestServerName connects by IP address and verifies another name in
// Vault's certificate; without the name, verification fails.
func TestServerName(t *testing.T) {
	v := vaulttest.Start(t)
	cfg := config(v, vault.TokenAuth{Token: v.RootToken()})
	cfg.TLS.ServerName = vaulttest.ServerName
	if err := newStore(t, cfg).Check(t.Context()); err != nil {
		t.Fatalf("Check with server name %s: %v", vaulttest.ServerName, err)
	}
	cfg.TLS.ServerName = "other.test"
	if err := newStore(t, cfg).Check(t.Context()); !errors.Is(err, vault.ErrUnreachable) {
		t.Fatalf("Check with a name not in the certificate = %v, want ErrUnreachable", err)
	}
	cfg.TLS = vault.TLSConfig{} // system roots do not know the test CA
	if err := newStore(t, cfg).Check(t.Context()); !errors.Is(err, vault.ErrUnreachable) {
		t.Fatalf("Check without the CA = %v, want ErrUnreachable", err)
	}
}

// TestNamespace puts a recording proxy in front of Vault: every request the
// store makes, logins included, carries the configured Enterprise
// namespace. The proxy removes the header, which the open-source Vault
// under test would refuse.
func TestNamespace(t *testing.T) {
	v := vaulttest.Start(t)
	v.WritePolicy(t, "meshca-keys", vaulttest.KeysPolicy)
	v.EnableAuth(t, "approle", "approle")
	roleID, secretID := v.AppRole(t, "approle", "meshca", map[string]any{"token_policies": []string{"meshca-keys"}})

	target, err := url.Parse(v.Addr())
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	pool := x509.NewCertPool()
	pemData, err := os.ReadFile(v.CAFile())
	if err != nil {
		t.Fatal(err)
	}
	pool.AppendCertsFromPEM(pemData)
	proxy.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	var mu sync.Mutex
	seen := map[string]string{} // request path -> namespace header
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.URL.Path] = r.Header.Get("X-Vault-Namespace")
		mu.Unlock()
		r.Header.Del("X-Vault-Namespace")
		proxy.ServeHTTP(w, r)
	}))
	defer srv.Close()
	caFile := writeFile(t, t.TempDir(), "proxy-ca.pem", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})))

	cfg := config(v, vault.AppRoleAuth{RoleID: roleID, SecretIDFile: writeFile(t, t.TempDir(), "secret-id", secretID)})
	cfg.Address = srv.URL
	cfg.TLS = vault.TLSConfig{CAFile: caFile}
	cfg.Namespace = "team-a/"
	s := newStore(t, cfg)
	if err := s.Check(t.Context()); err != nil {
		t.Fatalf("Check through the proxy: %v", err)
	}
	if err := signVerify(generate(t, s, "ca"), "namespaced"); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, path := range []string{"/v1/sys/health", "/v1/auth/approle/login", "/v1/transit/keys/meshca-ca.ecdsa-p256", "/v1/transit/sign/meshca-ca.ecdsa-p256"} {
		ns, ok := seen[path]
		if !ok {
			t.Errorf("no request to %s went through the proxy", path)
		} else if ns != "team-a/" {
			t.Errorf("%s: X-Vault-Namespace %q, want %q", path, ns, "team-a/")
		}
	}
}
