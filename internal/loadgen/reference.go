package loadgen

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/caclient"
)

// maxReferenceOps bounds each reference measurement by count as well as by
// time; no machine signs this many certificates in a few seconds.
const maxReferenceOps = 10_000_000

// Throughput is the outcome of an in-process reference measurement.
type Throughput struct {
	Ops     int
	Elapsed time.Duration
	Workers int
}

// PerSecond is the measured rate.
func (t Throughput) PerSecond() float64 {
	if t.Elapsed <= 0 {
		return 0
	}
	return float64(t.Ops) / t.Elapsed.Seconds()
}

// References are in-process figures measured on this machine just before
// the load, on GOMAXPROCS goroutines, so the end-to-end rate can be read
// against them.
type References struct {
	// Baseline is the bare x509.CreateCertificate of a P-256 SVID signed
	// by a P-256 intermediate key: one ECDSA signature plus the check of it
	// that the standard library makes, and DER encoding.
	Baseline Throughput
	// Issue is (*ca.Authority).Issue with a pre-built CSR: the minimum
	// crypto per issuance (CSR self-signature check, signing, re-verifying
	// the issued chain), without network, TLS, gRPC or authentication.
	Issue Throughput
	// AuthIssue adds the development authenticator's token verification to
	// Issue: all the server's per-request work except TLS and gRPC.
	AuthIssue Throughput
}

// measureReferences runs the three reference measurements, each for d.
func measureReferences(ctx context.Context, st *stack, token string, d time.Duration, workers int) (References, error) {
	var refs References
	caller, err := st.tokens.Authenticate(ctx, identity.Credential{Token: token})
	if err != nil {
		return refs, fmt.Errorf("loadgen: reference token: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return refs, fmt.Errorf("loadgen: %w", err)
	}
	csr, err := caclient.NewCSR(key)
	if err != nil {
		return refs, fmt.Errorf("loadgen: %w", err)
	}

	iss := st.authority.Issuer()
	serial, err := ca.NewSerial(rand.Reader)
	if err != nil {
		return refs, fmt.Errorf("loadgen: %w", err)
	}
	now := time.Now()
	tmpl, err := ca.LeafTemplate(caller.ID, key.Public(), serial,
		ca.Validity{NotBefore: now.Add(-ca.Backdate), NotAfter: now.Add(time.Hour)})
	if err != nil {
		return refs, fmt.Errorf("loadgen: %w", err)
	}
	// The template, serial included, is reused: the baseline is the
	// library call and nothing else.
	refs.Baseline, err = measure(ctx, workers, d, func() error {
		_, err := x509.CreateCertificate(rand.Reader, tmpl, iss.Cert, key.Public(), iss.Signer)
		return err
	})
	if err != nil {
		return refs, fmt.Errorf("loadgen: baseline: %w", err)
	}

	req := ca.Request{CSR: csr, ID: caller.ID}
	refs.Issue, err = measure(ctx, workers, d, func() error {
		_, err := st.authority.Issue(ctx, req)
		return err
	})
	if err != nil {
		return refs, fmt.Errorf("loadgen: issue reference: %w", err)
	}

	cred := identity.Credential{Token: token}
	refs.AuthIssue, err = measure(ctx, workers, d, func() error {
		c, err := st.tokens.Authenticate(ctx, cred)
		if err != nil {
			return err
		}
		_, err = st.authority.Issue(ctx, ca.Request{CSR: req.CSR, ID: c.ID})
		return err
	})
	if err != nil {
		return refs, fmt.Errorf("loadgen: authenticate-and-issue reference: %w", err)
	}
	return refs, nil
}

// measure runs op in a loop on workers goroutines for d, or until
// maxReferenceOps operations, and returns the throughput. The first error
// stops the measurement: a reference that fails measures nothing.
func measure(ctx context.Context, workers int, d time.Duration, op func() error) (Throughput, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		ops      atomic.Int64
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	start := time.Now()
	deadline := start.Add(d)
	for range workers {
		wg.Go(func() {
			// Reading the clock costs tens of nanoseconds against tens of
			// microseconds per operation, so every iteration checks it.
			for ctx.Err() == nil && time.Now().Before(deadline) {
				if ops.Add(1) > maxReferenceOps {
					ops.Add(-1)
					return
				}
				if err := op(); err != nil {
					ops.Add(-1)
					errOnce.Do(func() { firstErr = err })
					cancel()
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if firstErr == nil {
		// Only the caller can have cancelled ctx by now; a truncated
		// figure is no figure.
		firstErr = ctx.Err()
	}
	return Throughput{Ops: int(ops.Load()), Elapsed: elapsed, Workers: workers}, firstErr
}
