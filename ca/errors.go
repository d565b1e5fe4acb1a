package ca

import (
	"errors"
	"fmt"
)

var (
	// ErrNotReady reports a CA that has not loaded its signing state yet.
	ErrNotReady = errors.New("ca: not ready")
	// ErrForeignTrustDomain reports an identity outside the CA's trust domain.
	ErrForeignTrustDomain = errors.New("ca: identity outside the trust domain")
)

// CSRProblem classifies a rejected CSR, for metrics and audit records.
type CSRProblem string

// CSR problems.
const (
	CSRTooLarge        CSRProblem = "csr-too-large"
	CSRMalformed       CSRProblem = "csr-malformed"
	CSRBadSignature    CSRProblem = "csr-bad-signature"
	CSRKeyType         CSRProblem = "csr-key-type"
	CSRIdentity        CSRProblem = "csr-identity-mismatch"
	CSRUnsupportedSANs CSRProblem = "csr-unsupported-san"
)

// CSRError is a certificate signing request the CA refuses. Its message is
// safe to return to the caller: it describes only what the caller sent.
type CSRError struct {
	Problem CSRProblem
	Detail  string
}

func (e *CSRError) Error() string { return fmt.Sprintf("ca: %s: %s", e.Problem, e.Detail) }

func csrErr(p CSRProblem, format string, args ...any) error {
	return &CSRError{Problem: p, Detail: fmt.Sprintf(format, args...)}
}

// CoverageError reports an issuer whose remaining lifetime cannot cover the
// configured leaf lifetimes; the server refuses to start with it.
type CoverageError struct {
	Issuer            string
	Remaining, Needed string
}

func (e *CoverageError) Error() string {
	return fmt.Sprintf("ca: issuer %s expires in %s but must cover %s of leaf lifetimes; renew the CA certificate or lower the leaf TTL", e.Issuer, e.Remaining, e.Needed)
}
