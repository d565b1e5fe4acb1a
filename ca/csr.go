package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// MaxCSRBytes bounds a CSR before it is parsed. A P-384 or RSA-4096 CSR with
// one SAN is well under 2 KiB PEM; anything near this limit is abuse.
const MaxCSRBytes = 16 << 10

// ParseCSR decodes a PEM (or raw DER) certificate request, checks its size
// and its self-signature.
func ParseCSR(data []byte) (*x509.CertificateRequest, error) {
	if len(data) > MaxCSRBytes {
		return nil, csrErr(CSRTooLarge, "CSR is %d bytes, limit is %d", len(data), MaxCSRBytes)
	}
	der := data
	if block, rest := pem.Decode(data); block != nil {
		if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
			return nil, csrErr(CSRMalformed, "PEM block is %q, want CERTIFICATE REQUEST", block.Type)
		}
		if len(strings.TrimSpace(string(rest))) != 0 {
			return nil, csrErr(CSRMalformed, "unexpected data after the CSR PEM block")
		}
		der = block.Bytes
	} else if len(data) == 0 || data[0] != 0x30 {
		return nil, csrErr(CSRMalformed, "no PEM CERTIFICATE REQUEST block found")
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, csrErr(CSRMalformed, "cannot parse CSR: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, csrErr(CSRBadSignature, "CSR self-signature does not verify: %v", err)
	}
	return csr, nil
}

// CheckCSR enforces what a CSR may ask for: an allowed key, and no identity
// other than the caller's. The certificate's identity always comes from the
// authenticated caller; a CSR that names anything else is refused rather
// than silently corrected, so a misconfigured workload finds out. The one
// leniency is trust-domain aliases: a workload still configured with a
// former trust domain may ask for its own path in it, and gets the
// certificate in the current one.
func CheckCSR(csr *x509.CertificateRequest, caller spiffeid.ID, aliases ...spiffeid.TrustDomain) error {
	if err := CheckPublicKey(csr.PublicKey); err != nil {
		return err
	}
	if n := len(csr.DNSNames) + len(csr.EmailAddresses) + len(csr.IPAddresses); n > 0 {
		return csrErr(CSRUnsupportedSANs, "CSR asks for %d DNS/IP/email SANs; only the caller's SPIFFE ID %s may be requested", n, caller)
	}
	switch len(csr.URIs) {
	case 0:
		return nil
	case 1:
		got := csr.URIs[0].String()
		if got == caller.String() || isAlias(got, caller, aliases) {
			return nil
		}
		return csrErr(CSRIdentity, "CSR asks for %q but the caller is authenticated as %q", truncate(got, 256), caller)
	default:
		return csrErr(CSRIdentity, "CSR asks for %d URI SANs; at most one, the caller's SPIFFE ID %s, is allowed", len(csr.URIs), caller)
	}
}

// CheckPublicKey accepts ECDSA P-256/P-384 and RSA 2048-4096 keys. RSA keys
// above 4096 bits are refused: they cost the CA nothing to sign but every
// peer a lot to verify.
func CheckPublicKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384():
			return nil
		}
		return csrErr(CSRKeyType, "ECDSA curve %s not allowed; use P-256 or P-384", k.Curve.Params().Name)
	case *rsa.PublicKey:
		if bits := k.N.BitLen(); bits < 2048 || bits > 4096 {
			return csrErr(CSRKeyType, "RSA key of %d bits not allowed; use 2048 to 4096 bits", bits)
		}
		return nil
	default:
		return csrErr(CSRKeyType, "key type %T not allowed; use ECDSA P-256/P-384 or RSA 2048-4096", pub)
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + fmt.Sprintf("...(%d bytes)", len(s))
}

// isAlias reports whether uri is caller's ID in one of the alias trust
// domains.
func isAlias(uri string, caller spiffeid.ID, aliases []spiffeid.TrustDomain) bool {
	id, err := spiffeid.FromString(uri)
	if err != nil || id.Path() != caller.Path() {
		return false
	}
	return slices.Contains(aliases, id.TrustDomain())
}
