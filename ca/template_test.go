package ca_test

import (
	"crypto/rsa"
	"crypto/x509"
	"math/big"
	"testing"
	"time"

	"github.com/meshca/meshca/ca"
)

func TestLeafTemplateFields(t *testing.T) {
	key := newKey(t)
	v := ca.Validity{NotBefore: start, NotAfter: start.Add(time.Hour)}
	tmpl, err := ca.LeafTemplate(workload, key.Public(), big.NewInt(42), v)
	if err != nil {
		t.Fatal(err)
	}
	if len(tmpl.URIs) != 1 || tmpl.URIs[0].String() != workload.String() {
		t.Errorf("URIs = %v, want exactly [%s]", tmpl.URIs, workload)
	}
	if tmpl.IsCA || !tmpl.BasicConstraintsValid {
		t.Errorf("IsCA=%v BasicConstraintsValid=%v, want a non-CA with basic constraints", tmpl.IsCA, tmpl.BasicConstraintsValid)
	}
	if tmpl.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("KeyUsage = %v, want digitalSignature only for ECDSA", tmpl.KeyUsage)
	}
	if len(tmpl.ExtKeyUsage) != 2 || tmpl.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || tmpl.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
		t.Errorf("ExtKeyUsage = %v, want server and client auth", tmpl.ExtKeyUsage)
	}
	if len(tmpl.DNSNames)+len(tmpl.IPAddresses)+len(tmpl.EmailAddresses) != 0 {
		t.Errorf("leaf carries non-URI SANs")
	}
	if !tmpl.NotBefore.Equal(v.NotBefore) || !tmpl.NotAfter.Equal(v.NotAfter) {
		t.Errorf("validity = %v..%v, want %v..%v", tmpl.NotBefore, tmpl.NotAfter, v.NotBefore, v.NotAfter)
	}
}

func TestLeafTemplateRSAAddsKeyEncipherment(t *testing.T) {
	key, err := rsa.GenerateKey(randReader{}, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl, err := ca.LeafTemplate(workload, key.Public(), big.NewInt(1), ca.Validity{NotBefore: start, NotAfter: start.Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if want := x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment; tmpl.KeyUsage != want {
		t.Errorf("KeyUsage = %v, want %v", tmpl.KeyUsage, want)
	}
}

func TestNewSerialIs128BitRandom(t *testing.T) {
	seen := map[string]bool{}
	maxBits := 0
	for i := 0; i < 1000; i++ {
		s, err := ca.NewSerial(randReader{})
		if err != nil {
			t.Fatal(err)
		}
		if s.Sign() <= 0 || s.BitLen() > 128 {
			t.Fatalf("serial %s out of range (bits=%d)", s, s.BitLen())
		}
		if seen[s.String()] {
			t.Fatalf("serial %s repeated", s)
		}
		seen[s.String()] = true
		maxBits = max(maxBits, s.BitLen())
	}
	// With 1000 draws, the chance that none uses the top bit is 2^-1000.
	if maxBits != 128 {
		t.Errorf("largest serial has %d bits, want 128", maxBits)
	}
}
