package policy

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Mode is how a service accepts inbound traffic.
type Mode string

const (
	// ModeDisable accepts plaintext only; the sidecar does not terminate mTLS.
	ModeDisable Mode = "DISABLE"
	// ModePermissive accepts both mTLS and plaintext, for migration.
	ModePermissive Mode = "PERMISSIVE"
	// ModeStrict accepts mTLS only.
	ModeStrict Mode = "STRICT"
)

// ErrInvalid is wrapped by every validation error, so callers can map it to
// a client error without parsing messages.
var ErrInvalid = errors.New("policy: invalid")

// DefaultExcluded is excluded by Default: the API server is reached by
// clients that hold no mesh certificate.
const DefaultExcluded = "kubernetes.default.svc.cluster.local"

// Policy is the mesh-wide mTLS policy.
type Policy struct {
	Enabled  bool     `json:"enabled"`
	Mode     Mode     `json:"mode,omitempty"`             // STRICT or PERMISSIVE; "" means STRICT
	Excluded []string `json:"excludedServices,omitempty"` // FQDNs: exact, or "*.suffix" wildcards
}

// Default is the policy of a mesh nobody has configured: mTLS off, and the
// API server excluded so that turning it on does not cut off the cluster.
// It is already normalized.
func Default() Policy {
	return Policy{Mode: ModeStrict, Excluded: []string{DefaultExcluded}}
}

// Validate reports every problem in p, not just the first, in one error
// that wraps ErrInvalid. It accepts exactly what Normalize accepts.
func (p Policy) Validate() error {
	_, err := p.Normalize()
	return err
}

// Normalize returns p with every excluded name lower-cased, stripped of its
// trailing dot, sorted and de-duplicated, and Mode spelled out (upper case,
// "" becomes STRICT). Two policies that mean the same normalize to equal
// values, so revisions compare meaning, not spelling.
func (p Policy) Normalize() (Policy, error) {
	out := Policy{Enabled: p.Enabled, Mode: p.EffectiveMode()}
	var errs []error
	switch out.Mode {
	case ModeStrict, ModePermissive:
	case ModeDisable:
		errs = append(errs, fmt.Errorf("mode %s: set enabled to false instead", ModeDisable))
	default:
		errs = append(errs, fmt.Errorf("mode %q: want %s or %s", p.Mode, ModeStrict, ModePermissive))
	}
	for _, e := range p.Excluded {
		n, err := normalizePattern(e)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out.Excluded = append(out.Excluded, n)
	}
	if len(errs) > 0 {
		return Policy{}, &InvalidError{Problems: errs}
	}
	slices.Sort(out.Excluded)
	out.Excluded = slices.Compact(out.Excluded)
	if len(out.Excluded) == 0 {
		out.Excluded = nil
	}
	return out, nil
}

// EffectiveMode is the mode enforced while enabled: "" reads as STRICT, and
// the spelling is not significant.
func (p Policy) EffectiveMode() Mode {
	m := Mode(strings.ToUpper(strings.TrimSpace(string(p.Mode))))
	if m == "" {
		return ModeStrict
	}
	return m
}

// ModeFor returns the mode that applies to the service named fqdn. A name
// that is not a valid FQDN matches no exclusion.
func (p Policy) ModeFor(fqdn string) Mode {
	if !p.Enabled || p.Excludes(fqdn) {
		return ModeDisable
	}
	return p.EffectiveMode()
}

// Excludes reports whether fqdn matches an entry of p.Excluded.
func (p Policy) Excludes(fqdn string) bool {
	name, err := NormalizeFQDN(fqdn)
	if err != nil {
		return false
	}
	for _, e := range p.Excluded {
		pat, err := normalizePattern(e)
		if err != nil {
			continue
		}
		if matches(pat, name) {
			return true
		}
	}
	return false
}

// Equal reports whether p and q mean the same policy.
func (p Policy) Equal(q Policy) bool {
	np, err1 := p.Normalize()
	nq, err2 := q.Normalize()
	if err1 != nil || err2 != nil {
		return p.Enabled == q.Enabled && p.Mode == q.Mode && slices.Equal(p.Excluded, q.Excluded)
	}
	return np.Enabled == nq.Enabled && np.Mode == nq.Mode && slices.Equal(np.Excluded, nq.Excluded)
}

// String is a one-line summary for logs.
func (p Policy) String() string {
	if !p.Enabled {
		return fmt.Sprintf("mtls=off excluded=%v", p.Excluded)
	}
	return fmt.Sprintf("mtls=%s excluded=%v", p.EffectiveMode(), p.Excluded)
}

// matches reports whether the normalized pattern pat covers the normalized
// name: "*.x" covers any name with at least one label before ".x".
func matches(pat, name string) bool {
	if suffix, ok := strings.CutPrefix(pat, "*"); ok {
		return len(name) > len(suffix) && strings.HasSuffix(name, suffix)
	}
	return pat == name
}

// InvalidError lists every problem found in a policy.
type InvalidError struct {
	Problems []error
}

func (e *InvalidError) Error() string {
	var b strings.Builder
	b.WriteString("policy: invalid: ")
	for i, p := range e.Problems {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(p.Error())
	}
	return b.String()
}

// Unwrap exposes ErrInvalid and each problem to errors.Is and errors.As.
func (e *InvalidError) Unwrap() []error {
	return append([]error{ErrInvalid}, e.Problems...)
}
