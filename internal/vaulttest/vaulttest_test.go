package vaulttest_test

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/meshca/meshca/internal/vaulttest"
)

// TestStart proves the fixture is a real, healthy Vault in both modes:
// Transit is mounted where asked, the root token works, the TLS certificate
// verifies under the CA file for ServerName, and Seal seals it; a
// persistent Vault opens again with Unseal, with its data.
func TestStart(t *testing.T) {
	for _, persistent := range []bool{false, true} {
		t.Run(fmt.Sprintf("persistent=%t", persistent), func(t *testing.T) {
			v := vaulttest.StartWith(t, vaulttest.Options{TransitMount: "pki-keys", Persistent: persistent})

			checkTransitMount(t, v.Client(), "pki-keys/")

			pemData, err := os.ReadFile(v.CAFile())
			if err != nil {
				t.Fatal(err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pemData) {
				t.Fatalf("no certificates in %s", v.CAFile())
			}
			u, err := url.Parse(v.Addr())
			if err != nil {
				t.Fatal(err)
			}
			// Connect by IP address but verify the extra name, as a client
			// configured with a server name does.
			hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: vaulttest.ServerName}}}
			resp, err := hc.Get("https://" + u.Host + "/v1/sys/health")
			if err != nil {
				t.Fatalf("health over TLS with server name %s: %v", vaulttest.ServerName, err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("health: %s, want 200 OK", resp.Status)
			}

			v.Write(t, "pki-keys/keys/before-seal", map[string]any{"type": "ecdsa-p256"})
			v.Seal(t)
			if !sealed(t, v.Client()) {
				t.Fatal("Vault is not sealed after Seal")
			}
			if _, err := v.Client().Logical().ReadWithContext(t.Context(), "pki-keys/keys/before-seal"); err == nil {
				t.Fatal("reading a Transit key from a sealed Vault succeeded")
			}
			if !persistent {
				return // a development Vault's unseal key is not kept
			}

			v.Unseal(t)
			if sealed(t, v.Client()) {
				t.Fatal("Vault is sealed after Unseal")
			}
			if k := v.Read(t, "pki-keys/keys/before-seal"); k == nil {
				t.Fatal("the Transit key made before Seal is gone after Unseal")
			}
			// TransitPublicKey reads the mount Start enabled.
			if _, ok := v.TransitPublicKey(t, "before-seal").(*ecdsa.PublicKey); !ok {
				t.Fatal("the ecdsa-p256 Transit key's public key is not ECDSA")
			}
		})
	}
}

// TestRestartKeepsTransitKey: a persistent Vault stopped mid-test refuses
// connections, and after Restart a client that kept its address, CA file
// and token signs with the same Transit key as before.
func TestRestartKeepsTransitKey(t *testing.T) {
	v := vaulttest.StartWith(t, vaulttest.Options{Persistent: true})
	addr, caFile, token := v.Addr(), v.CAFile(), v.RootToken()

	// A client of its own, configured once, as meshca's store is.
	c := newClient(t, addr, caFile, token)
	if _, err := c.Logical().WriteWithContext(t.Context(), "transit/keys/ca", map[string]any{"type": "ecdsa-p256"}); err != nil {
		t.Fatalf("creating the Transit key: %v", err)
	}
	pub, ok := v.TransitPublicKey(t, "ca").(*ecdsa.PublicKey)
	if !ok {
		t.Fatal("the ecdsa-p256 Transit key's public key is not ECDSA")
	}
	digest := sha256.Sum256([]byte("before the outage"))
	if err := signVerify(t, c, pub, "ca", digest[:]); err != nil {
		t.Fatalf("before Stop: %v", err)
	}

	v.Stop(t)
	u, err := url.Parse(addr)
	if err != nil {
		t.Fatal(err)
	}
	if conn, err := net.DialTimeout("tcp", u.Host, 5*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		if conn != nil {
			conn.Close()
		}
		t.Fatalf("connecting to %s after Stop: %v, want connection refused", u.Host, err)
	}
	if err := signVerify(t, c, pub, "ca", digest[:]); err == nil {
		t.Fatal("signing while Vault is stopped succeeded")
	}

	v.Restart(t)
	if v.Addr() != addr || v.CAFile() != caFile || v.RootToken() != token {
		t.Fatalf("after Restart: address %s, CA file %s, token changed %t; want %s, %s, unchanged",
			v.Addr(), v.CAFile(), v.RootToken() != token, addr, caFile)
	}
	if sealed(t, c) {
		t.Fatal("Vault is sealed after Restart")
	}
	if got := v.TransitPublicKey(t, "ca"); !pub.Equal(got) {
		t.Fatal("the Transit key's public key changed across Restart")
	}
	digest = sha256.Sum256([]byte("after the outage"))
	if err := signVerify(t, c, pub, "ca", digest[:]); err != nil {
		t.Fatalf("after Restart: %v", err)
	}
	// The fixture's own client and helpers work on as before.
	checkTransitMount(t, v.Client(), "transit/")
}

// TestRestartTwice: each restart picks up the data the previous run wrote,
// not only the first run's.
func TestRestartTwice(t *testing.T) {
	v := vaulttest.StartWith(t, vaulttest.Options{Persistent: true})
	v.Write(t, "transit/keys/first", map[string]any{"type": "ecdsa-p256"})
	v.Stop(t)
	v.Restart(t)
	v.Write(t, "transit/keys/second", map[string]any{"type": "ecdsa-p256"})
	v.Stop(t)
	v.Restart(t)
	for _, name := range []string{"first", "second"} {
		if k := v.Read(t, "transit/keys/"+name); k == nil {
			t.Errorf("Transit key %s is gone after two restarts", name)
		}
	}
}

func newClient(t *testing.T, addr, caFile, token string) *api.Client {
	t.Helper()
	cfg := api.DefaultConfig()
	cfg.Address = addr
	cfg.MaxRetries = 0
	if err := cfg.ConfigureTLS(&api.TLSConfig{CACert: caFile}); err != nil {
		t.Fatal(err)
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(token)
	c.ClearNamespace()
	return c
}

func checkTransitMount(t *testing.T, c *api.Client, path string) {
	t.Helper()
	mounts, err := c.Sys().ListMountsWithContext(t.Context())
	if err != nil {
		t.Fatalf("listing mounts as root: %v", err)
	}
	if m, ok := mounts[path]; !ok || m.Type != "transit" {
		t.Fatalf("mount %s = %+v, want a transit mount", path, m)
	}
}

func sealed(t *testing.T, c *api.Client) bool {
	t.Helper()
	h, err := c.Sys().HealthWithContext(t.Context())
	if err != nil {
		t.Fatalf("health: %v", err)
	}
	return h.Sealed
}

// signVerify has Transit sign digest with key name and checks the
// signature under pub.
func signVerify(t *testing.T, c *api.Client, pub *ecdsa.PublicKey, name string, digest []byte) error {
	t.Helper()
	s, err := c.Logical().WriteWithContext(t.Context(), "transit/sign/"+name, map[string]any{
		"input":                base64.StdEncoding.EncodeToString(digest),
		"prehashed":            true,
		"hash_algorithm":       "sha2-256",
		"marshaling_algorithm": "asn1",
	})
	if err != nil {
		return err
	}
	sig, _ := s.Data["signature"].(string)
	enc, ok := strings.CutPrefix(sig, "vault:v1:")
	if !ok {
		return fmt.Errorf("signature %q lacks the prefix vault:v1:", sig)
	}
	der, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		return err
	}
	if !ecdsa.VerifyASN1(pub, digest, der) {
		return errors.New("signature does not verify under the key's public key")
	}
	return nil
}
