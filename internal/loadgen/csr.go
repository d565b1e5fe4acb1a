package loadgen

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"sync"

	"github.com/meshca/meshca/internal/caclient"
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
		csr, err := caclient.NewCSR(key)
		if err != nil {
			return nil, fmt.Errorf("loadgen: %w", err)
		}
		pool[i] = clientCSR{pem: string(csr), pub: key.Public()}
	}
	return pool, nil
}

// warmUp has every worker make one request, concurrently, and verifies
// each response in full, as caclient does: the chain verifies against the
// trust bundle and certifies the key of the CSR sent. It opens every connection (TLS
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
			if _, err := caclient.Verify(resp.GetCertChain(), c.pub, bundle); err != nil {
				errs[i] = fmt.Errorf("loadgen: warm-up response: %w", err)
			}
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
