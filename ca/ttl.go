package ca

import (
	"fmt"
	"time"
)

// Backdate is how far before "now" a leaf becomes valid, so a peer whose
// clock runs slightly behind the CA's does not reject a fresh certificate.
const Backdate = time.Minute

// RenewalPoint is when a certificate valid over [notBefore, notAfter),
// obtained at received, is due for renewal: frac of its lifetime, counted
// from the later of notBefore and received. Leaves are backdated by
// Backdate, so counted from notBefore a short-lived one would be due as
// soon as it arrives.
func RenewalPoint(notBefore, notAfter, received time.Time, frac float64) time.Time {
	start := notBefore
	if received.After(start) {
		start = received
	}
	return start.Add(time.Duration(frac * float64(notAfter.Sub(start))))
}

// TTLPolicy decides leaf lifetimes.
type TTLPolicy struct {
	// Default applies when the caller asks for no particular lifetime.
	Default time.Duration
	// Max caps what a caller may ask for.
	Max time.Duration
	// Coverage is how many default leaf lifetimes the issuer must still be
	// valid for; below that the CA refuses to start, because it would only
	// be able to hand out truncated certificates.
	Coverage int
}

// DefaultTTLPolicy is 1h leaves, at most 24h, issuer valid for ≥ 3 leaves.
var DefaultTTLPolicy = TTLPolicy{Default: time.Hour, Max: 24 * time.Hour, Coverage: 3}

// Validate checks the policy is coherent.
func (p TTLPolicy) Validate() error {
	switch {
	case p.Default <= 0:
		return fmt.Errorf("ca: default leaf TTL must be positive, got %s", p.Default)
	case p.Max < p.Default:
		return fmt.Errorf("ca: max leaf TTL %s is below the default %s", p.Max, p.Default)
	case p.Coverage < 1:
		return fmt.Errorf("ca: issuer coverage must be at least 1 leaf lifetime, got %d", p.Coverage)
	}
	return nil
}

// LeafValidity returns the validity of a leaf issued at now for a requested
// TTL (0 for the default) by an issuer valid over issuer. The leaf never
// outlives its issuer and never starts before it. Requests above Max are
// clamped rather than refused: Istio's agents ask for 24h by default, and a
// shorter certificate is always safe to give.
func (p TTLPolicy) LeafValidity(now time.Time, requested time.Duration, issuer Validity) (v Validity, clamped bool) {
	ttl := requested
	if ttl <= 0 {
		ttl = p.Default
	}
	if ttl > p.Max {
		ttl, clamped = p.Max, true
	}
	v = Validity{NotBefore: now.Add(-Backdate), NotAfter: now.Add(ttl)}
	if v.NotBefore.Before(issuer.NotBefore) {
		v.NotBefore = issuer.NotBefore
	}
	if v.NotAfter.After(issuer.NotAfter) {
		v.NotAfter, clamped = issuer.NotAfter, true
	}
	return v, clamped
}

// CheckCoverage reports a *CoverageError when an issuer valid until notAfter
// cannot cover Coverage default leaf lifetimes from now.
func (p TTLPolicy) CheckCoverage(now, notAfter time.Time, issuer string) error {
	need := time.Duration(p.Coverage) * p.Default
	if left := notAfter.Sub(now); left < need {
		return &CoverageError{Issuer: issuer, Remaining: left.Round(time.Second).String(),
			Needed: fmt.Sprintf("%d × %s = %s", p.Coverage, p.Default, need)}
	}
	return nil
}
