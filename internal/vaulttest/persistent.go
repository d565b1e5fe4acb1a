package vaulttest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/meshca/meshca/internal/testenv/fixture"
)

// certLifetime covers any test; the certificate is made afresh per Start.
const certLifetime = 24 * time.Hour

// startPersistent writes a CA and a serving certificate (Vault generates
// them only in development mode), starts Vault on file storage, and
// initialises and unseals it.
func (v *Vault) startPersistent() error {
	if err := writeTLS(v.dir, v.caFile); err != nil {
		return fmt.Errorf("TLS certificates: %w", err)
	}
	// sys/seal-status answers before initialisation; sys/health does not.
	if err := v.launch(fixture.FreePort, v.persistentProcess, "/v1/sys/seal-status"); err != nil {
		return err
	}
	if err := v.makeClient(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	// One share, threshold one: a single key unseals, and it is kept here.
	resp, err := v.client.Sys().InitWithContext(ctx, &api.InitRequest{SecretShares: 1, SecretThreshold: 1})
	if err != nil {
		return fmt.Errorf("initialising: %w", err)
	}
	if len(resp.KeysB64) != 1 || resp.RootToken == "" {
		return fmt.Errorf("initialising: got %d unseal keys and root token %t, want 1 and one", len(resp.KeysB64), resp.RootToken != "")
	}
	v.unsealKey, v.token = resp.KeysB64[0], resp.RootToken
	v.client.SetToken(v.token)
	return v.unseal()
}

// persistentProcess writes the configuration for Vault's port, which only
// the first start chooses, and runs Vault with it.
func (v *Vault) persistentProcess() (*fixture.Process, error) {
	addr := v.hostport()
	// JSON, which Vault's configuration parser accepts, spares quoting the
	// paths by hand.
	cfg := map[string]any{
		"storage": map[string]any{"file": map[string]any{"path": filepath.Join(v.dir, "data")}},
		"listener": map[string]any{"tcp": map[string]any{
			"address":       addr,
			"tls_cert_file": filepath.Join(v.dir, "vault-cert.pem"),
			"tls_key_file":  filepath.Join(v.dir, "vault-key.pem"),
		}},
		"api_addr": "https://" + addr,
		// Otherwise Vault listens for cluster traffic on port+1, which may
		// belong to another test; one node on file storage needs none.
		"disable_clustering": true,
		// mlock needs a privilege tests do not have, and the data is a
		// test's.
		"disable_mlock": true,
		"ui":            false,
	}
	data, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(v.dir, "vault.json")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return nil, fmt.Errorf("vault configuration: %w", err)
	}
	return fixture.Start("vault", v.logPath, serverEnv(), v.bin, "server", "-config="+path)
}

// restart runs Vault again on its port after Stop and unseals it.
func (v *Vault) restart() error {
	// The port is free when nothing took it while Vault was down, as an
	// outgoing connection may for its local port; wait for that to end.
	samePort := func() (int, error) { return v.port, waitBindable(v.hostport(), readyTimeout) }
	if err := v.launch(samePort, v.persistentProcess, "/v1/sys/seal-status"); err != nil {
		return err
	}
	return v.unseal()
}

// waitBindable polls until hostport can be bound, which is when Vault can
// bind it.
func waitBindable(hostport string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		l, err := net.Listen("tcp", hostport)
		if err == nil {
			return l.Close()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("port %s still taken after %v, Vault cannot restart on it: %w", hostport, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// writeTLS writes a new CA to caFile and a certificate it signs for
// localhost, 127.0.0.1 and ServerName, with its key, next to it, named as
// development mode names them.
func writeTLS(dir, caFile string) error {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "vaulttest CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(certLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	if caTmpl.SerialNumber, err = serial(); err != nil {
		return err
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "localhost"},
		DNSNames:    []string{"localhost", ServerName},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:   now.Add(-time.Hour),
		NotAfter:    now.Add(certLifetime),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if tmpl.SerialNumber, err = serial(); err != nil {
		return err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return errors.Join(
		writePEM(caFile, "CERTIFICATE", caDER),
		writePEM(filepath.Join(dir, "vault-cert.pem"), "CERTIFICATE", der),
		writePEM(filepath.Join(dir, "vault-key.pem"), "PRIVATE KEY", keyDER),
	)
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
}

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}
