package envoysim

import (
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

type matchOp int

const (
	opExact matchOp = iota
	opPrefix
	opSuffix
	opContains
)

// sanMatcher is a match_typed_subject_alt_names entry.
type sanMatcher struct {
	typ        tlsv3.SubjectAltNameMatcher_SanType
	op         matchOp
	value      string
	ignoreCase bool
}

func (m sanMatcher) matchesCert(c *x509.Certificate) bool {
	var sans []string
	switch m.typ {
	case tlsv3.SubjectAltNameMatcher_URI:
		for _, u := range c.URIs {
			sans = append(sans, u.String())
		}
	case tlsv3.SubjectAltNameMatcher_DNS:
		sans = c.DNSNames
	case tlsv3.SubjectAltNameMatcher_EMAIL:
		sans = c.EmailAddresses
	case tlsv3.SubjectAltNameMatcher_IP_ADDRESS:
		for _, ip := range c.IPAddresses {
			sans = append(sans, ip.String())
		}
	}
	for _, s := range sans {
		if m.matches(s) {
			return true
		}
	}
	return false
}

func (m sanMatcher) matches(s string) bool {
	v := m.value
	if m.ignoreCase {
		s, v = strings.ToLower(s), strings.ToLower(v)
	}
	switch m.op {
	case opExact:
		return s == v
	case opPrefix:
		return strings.HasPrefix(s, v)
	case opSuffix:
		return strings.HasSuffix(s, v)
	case opContains:
		return strings.Contains(s, v)
	}
	return false
}

// validator checks a peer's chain as Envoy's default certificate
// validator does with a trusted CA and SAN matchers.
type validator struct {
	roots    *x509.CertPool
	matchers []sanMatcher
}

// verify checks chain (leaf first) up to the roots at now, and, when there
// are matchers, that one of them matches one of the leaf's SANs. Extended
// key usages are not checked, as Envoy does not by default.
func (v *validator) verify(chain []*x509.Certificate, now time.Time) error {
	if len(chain) == 0 {
		return errors.New("envoysim: the peer sent no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{
		Roots: v.roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return fmt.Errorf("envoysim: peer certificate: %w", err)
	}
	if len(v.matchers) == 0 {
		return nil
	}
	for _, m := range v.matchers {
		if m.matchesCert(chain[0]) {
			return nil
		}
	}
	return errors.New("envoysim: peer certificate: no subject alternative name matches")
}
