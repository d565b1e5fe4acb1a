package vaulttest_test

import (
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"net/url"
	"os"
	"testing"

	"github.com/meshca/meshca/internal/vaulttest"
)

// TestStart proves the fixture is a real, healthy Vault: Transit is mounted
// where asked, the root token works, the TLS certificate verifies under the
// CA file for ServerName, and Seal seals it.
func TestStart(t *testing.T) {
	v := vaulttest.StartWith(t, vaulttest.Options{TransitMount: "pki-keys"})

	mounts, err := v.Client().Sys().ListMountsWithContext(t.Context())
	if err != nil {
		t.Fatalf("listing mounts as root: %v", err)
	}
	if m, ok := mounts["pki-keys/"]; !ok || m.Type != "transit" {
		t.Fatalf("mount pki-keys/ = %+v, want a transit mount", m)
	}

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

	v.Seal(t)
	h, err := v.Client().Sys().HealthWithContext(t.Context())
	if err != nil {
		t.Fatalf("health after sealing: %v", err)
	}
	if !h.Sealed {
		t.Fatal("Vault is not sealed after Seal")
	}
}
