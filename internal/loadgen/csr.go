package loadgen

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
)

// clientCSR is a pre-generated CSR and the public key it certifies.
type clientCSR struct {
	pem string
	pub crypto.PublicKey
}

// newCSRPool generates n P-256 keys and CSRs, the kind caclient and Istio's
// agent send: an empty subject, since the identity comes from the token.
// The private keys are dropped; nothing in a benchmark uses the issued
// certificates.
func newCSRPool(n int) ([]clientCSR, error) {
	pool := make([]clientCSR, n)
	for i := range pool {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("loadgen: client key: %w", err)
		}
		csr, err := newCSR(key)
		if err != nil {
			return nil, err
		}
		pool[i] = clientCSR{pem: csr, pub: key.Public()}
	}
	return pool, nil
}

func newCSR(key crypto.Signer) (string, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return "", fmt.Errorf("loadgen: create CSR: %w", err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), nil
}

// warmUp has every worker make one request, concurrently, and verifies
// each response in full: the chain verifies against the trust bundle and
// certifies the key of the CSR sent. It opens every connection (TLS
// handshakes are not part of the timed phase) and proves the target issues
// real certificates before any figure is taken.
func warmUp(ctx context.Context, workers []*worker, pool []clientCSR, bundle []*x509.Certificate) error {
	errs := make([]error, len(workers))
	var wg sync.WaitGroup
	for i, w := range workers {
		wg.Go(func() {
			c := pool[w.id%len(pool)]
			resp, err := w.call(ctx, w.reqs[w.id%len(w.reqs)])
			if err != nil {
				errs[i] = fmt.Errorf("loadgen: warm-up request: %w", err)
				return
			}
			errs[i] = verifyResponse(resp, c.pub, bundle)
		})
	}
	wg.Wait()
	// Every client usually fails the same way; one error says it.
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

func verifyResponse(resp *pb.IstioCertificateResponse, pub crypto.PublicKey, bundle []*x509.Certificate) error {
	elems := resp.GetCertChain()
	if len(elems) < 2 {
		return fmt.Errorf("loadgen: warm-up response holds %d certificates, want a leaf and a root at least", len(elems))
	}
	// The last element is the server's root, which proves nothing; the
	// chain must verify against our own bundle.
	chain := make([]*x509.Certificate, 0, len(elems)-1)
	for _, e := range elems[:len(elems)-1] {
		certs, err := ca.ParseCerts([]byte(e))
		if err != nil {
			return fmt.Errorf("loadgen: warm-up response: %w", err)
		}
		chain = append(chain, certs...)
	}
	id, err := x509svid.IDFromCert(chain[0])
	if err != nil {
		return fmt.Errorf("loadgen: warm-up certificate: %w", err)
	}
	if _, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(id.TrustDomain(), bundle)); err != nil {
		return fmt.Errorf("loadgen: warm-up certificate does not verify against the trust bundle: %w", err)
	}
	if k, ok := chain[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(pub) {
		return errors.New("loadgen: warm-up certificate does not certify the key of the CSR sent")
	}
	return nil
}
