package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"strings"
)

// ConfigMap keys. The first three are Istio 1.0's mesh-wide settings, so a
// ConfigMap written for Istio reads unchanged. KeyJSON holds the whole
// policy as JSON, the FileStore's format, for `kubectl create configmap
// --from-file=policy.json`. A ConfigMap uses one style or the other: both
// at once is ambiguous and rejected.
const (
	KeyEnabled  = "mtls.enabled"         // "true" or "false" (as strconv.ParseBool reads them)
	KeyMode     = "mtls.mode"            // STRICT or PERMISSIVE; absent means STRICT
	KeyExcluded = "mtlsExcludedServices" // a list of FQDNs, see ParseList
	KeyJSON     = "policy.json"
)

// ParseConfigMap reads a policy from a ConfigMap's data. Data with none of
// the policy keys is an unconfigured mesh and reads as Default; otherwise
// an absent key means false, STRICT or no exclusions. Keys it does not know
// are ignored. The result is normalized; every problem found is reported
// in one error wrapping ErrInvalid.
func ParseConfigMap(data map[string]string) (Policy, error) {
	_, hasJSON := data[KeyJSON]
	istio := hasIstioKeys(data)
	switch {
	case hasJSON && istio:
		return Policy{}, fmt.Errorf("%w: both %s and %s/%s/%s are set; keep one style", ErrInvalid, KeyJSON, KeyEnabled, KeyMode, KeyExcluded)
	case hasJSON:
		return ParseJSON([]byte(data[KeyJSON]))
	case !istio:
		return Default(), nil
	}
	var p Policy
	var errs []error
	if v, ok := data[KeyEnabled]; ok {
		b, err := strconv.ParseBool(strings.TrimSpace(v))
		if err != nil {
			errs = append(errs, fmt.Errorf("%s %q: want true or false", KeyEnabled, v))
		}
		p.Enabled = b
	}
	p.Mode = Mode(data[KeyMode])
	if v, ok := data[KeyExcluded]; ok {
		list, err := ParseList(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", KeyExcluded, err))
		}
		p.Excluded = list
	}
	n, err := p.Normalize()
	var inv *InvalidError
	switch {
	case errors.As(err, &inv):
		errs = append(errs, inv.Problems...)
	case err != nil:
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return Policy{}, &InvalidError{Problems: errs}
	}
	return n, nil
}

func hasIstioKeys(data map[string]string) bool {
	for _, k := range []string{KeyEnabled, KeyMode, KeyExcluded} {
		if _, ok := data[k]; ok {
			return true
		}
	}
	return false
}

// FormatConfigMap returns a copy of data with p written in, in the style
// data already uses (Istio keys unless it holds KeyJSON). Every other key
// is kept as it was. p must be valid.
func FormatConfigMap(data map[string]string, p Policy) (map[string]string, error) {
	n, err := p.Normalize()
	if err != nil {
		return nil, err
	}
	out := maps.Clone(data)
	if out == nil {
		out = make(map[string]string)
	}
	if _, ok := data[KeyJSON]; ok {
		b, err := FormatJSON(n)
		if err != nil {
			return nil, err
		}
		out[KeyJSON] = string(b)
		return out, nil
	}
	out[KeyEnabled] = strconv.FormatBool(n.Enabled)
	out[KeyMode] = string(n.Mode)
	out[KeyExcluded] = FormatList(n.Excluded)
	return out, nil
}

// ParseList reads a list of names in any of the forms people write in a
// ConfigMap: a JSON or YAML flow list (["a", "b"] or [a, b]), a YAML block
// list ("- a" per line), or names separated by commas or newlines. Blank
// items between separators are dropped; an empty quoted string is kept, for
// validation to reject.
func ParseList(s string) ([]string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	if strings.HasPrefix(s, "[") {
		var list []string
		if err := json.Unmarshal([]byte(s), &list); err == nil {
			return list, nil
		}
		inner, ok := strings.CutSuffix(s[1:], "]")
		if !ok {
			return nil, fmt.Errorf("%w: list %q has no closing ]", ErrInvalid, s)
		}
		return splitItems(inner, false)
	}
	return splitItems(s, true)
}

// splitItems splits on commas and newlines, trimming blanks, YAML "- "
// markers (when block is set) and matching quotes.
func splitItems(s string, block bool) ([]string, error) {
	var out []string
	for line := range strings.SplitSeq(s, "\n") {
		line = strings.TrimSpace(line)
		if block {
			if rest, ok := strings.CutPrefix(line, "-"); ok && (rest == "" || rest[0] == ' ' || rest[0] == '\t') {
				line = strings.TrimSpace(rest)
			}
		}
		for item := range strings.SplitSeq(line, ",") {
			item = strings.TrimSpace(item)
			if item == "" {
				continue
			}
			if q := item[0]; q == '"' || q == '\'' {
				if len(item) < 2 || item[len(item)-1] != q {
					return nil, fmt.Errorf("%w: unbalanced quote in %q", ErrInvalid, item)
				}
				item = item[1 : len(item)-1]
			}
			out = append(out, item)
		}
	}
	return out, nil
}

// FormatList writes names as a JSON list, which is also YAML, so Istio and
// ParseList both read it. An empty list is "[]".
func FormatList(names []string) string {
	if len(names) == 0 {
		return "[]"
	}
	b, _ := json.Marshal(names) // []string always marshals
	return string(b)
}

// ParseJSON reads a policy in the FileStore's JSON format. Unknown fields
// are rejected: a misspelled key must not silently mean "no exclusions".
func ParseJSON(b []byte) (Policy, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var p Policy
	if err := dec.Decode(&p); err != nil {
		return Policy{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if dec.More() {
		return Policy{}, fmt.Errorf("%w: data after the JSON object", ErrInvalid)
	}
	return p.Normalize()
}

// FormatJSON writes p normalized, indented, with a final newline, so that
// the file reads well and diffs cleanly.
func FormatJSON(p Policy) ([]byte, error) {
	n, err := p.Normalize()
	if err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(n, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	return append(b, '\n'), nil
}
