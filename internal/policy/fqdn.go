package policy

import (
	"fmt"
	"strings"
)

const (
	maxLabel = 63
	// maxName is the longest name in presentation form without the
	// trailing dot (RFC 1035's 255 octets on the wire).
	maxName = 253
)

// NormalizeFQDN returns s lower-cased and without its trailing dot, or an
// error wrapping ErrInvalid that names s. Labels are LDH (letters, digits,
// hyphen, not at either end); internationalized names must be given in
// their ASCII (xn--) form, since that is what appears in SANs and SNI.
func NormalizeFQDN(s string) (string, error) {
	n, err := normalizeName(s)
	if err != nil {
		return "", fmt.Errorf("%w: fqdn %q: %w", ErrInvalid, s, err)
	}
	return n, nil
}

// normalizePattern accepts an exact FQDN or "*." followed by one.
func normalizePattern(s string) (string, error) {
	rest, wild := strings.CutPrefix(s, "*.")
	n, err := normalizeName(rest)
	if err != nil {
		return "", fmt.Errorf("excluded service %q: %w", s, err)
	}
	if wild {
		return "*." + n, nil
	}
	return n, nil
}

func normalizeName(s string) (string, error) {
	// Check before lower-casing: strings.ToLower maps some non-ASCII
	// letters (the Kelvin sign) to ASCII ones, which would let a look-alike
	// name pass as another.
	n := strings.TrimSuffix(s, ".")
	if n == "" {
		return "", fmt.Errorf("empty name")
	}
	if len(n) > maxName {
		return "", fmt.Errorf("name is %d characters, longer than %d", len(n), maxName)
	}
	for label := range strings.SplitSeq(n, ".") {
		if err := checkLabel(label); err != nil {
			return "", err
		}
	}
	return strings.ToLower(n), nil
}

func checkLabel(l string) error {
	switch {
	case l == "":
		return fmt.Errorf("empty label")
	case len(l) > maxLabel:
		return fmt.Errorf("label %q is %d characters, longer than %d", l, len(l), maxLabel)
	case l[0] == '-' || l[len(l)-1] == '-':
		return fmt.Errorf("label %q starts or ends with a hyphen", l)
	}
	for _, r := range l {
		switch {
		case r == '*':
			return fmt.Errorf("label %q: a wildcard is allowed only as the whole first label", l)
		case r > 0x7f:
			return fmt.Errorf("label %q: non-ASCII character %q; use the IDNA (xn--) form", l, r)
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-':
		default:
			return fmt.Errorf("label %q: invalid character %q", l, r)
		}
	}
	return nil
}
