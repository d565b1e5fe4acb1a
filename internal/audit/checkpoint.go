package audit

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"strconv"
)

// Signer signs checkpoints. The CA implements it with its signing
// intermediate, so a checkpoint proves the ledger's head was known to the
// holder of that key at the time.
type Signer interface {
	// SignCheckpoint signs digest, a SHA-256 (see CheckpointDigest), and
	// returns the signature with the signer's certificate chain, leaf
	// first. ECDSA signatures are ASN.1, RSA ones PKCS #1 v1.5 or PSS, and
	// Ed25519 signs the digest bytes themselves.
	SignCheckpoint(ctx context.Context, digest []byte) (sig []byte, chain []*x509.Certificate, err error)
}

// checkpointDomain separates checkpoint signatures from anything else the
// same key signs, such as certificates.
const checkpointDomain = "meshca-audit-checkpoint-v1\x00"

// CheckpointDigest is what a checkpoint signs: the SHA-256 of the domain
// string "meshca-audit-checkpoint-v1", a NUL, the head hash in hex, a NUL
// and the decimal seq of the record whose hash head is.
func CheckpointDigest(head string, seq uint64) []byte {
	msg := make([]byte, 0, len(checkpointDomain)+len(head)+21)
	msg = append(msg, checkpointDomain...)
	msg = append(msg, head...)
	msg = append(msg, 0)
	msg = strconv.AppendUint(msg, seq, 10)
	sum := sha256.Sum256(msg)
	return sum[:]
}

// VerifyCheckpoint checks a checkpoint record on its own: that it names the
// record before it as its head and that its signature verifies under the
// leaf of its signer chain. With roots, the chain must also lead to one of
// them at the checkpoint's time. It does not check the record's hash.
func VerifyCheckpoint(r Record, roots []*x509.Certificate) error {
	if r.Kind != KindCheckpoint {
		return fmt.Errorf("audit: record %d is a %q, not a checkpoint", r.Seq, r.Kind)
	}
	if r.Seq < 2 {
		return fmt.Errorf("audit: checkpoint at seq %d has nothing before it", r.Seq)
	}
	if r.Head != r.Prev {
		return fmt.Errorf("audit: checkpoint head %s is not the previous record's hash %s", r.Head, r.Prev)
	}
	if len(r.SignerChain) == 0 {
		return errors.New("audit: checkpoint has no signer certificate")
	}
	certs := make([]*x509.Certificate, len(r.SignerChain))
	for i, der := range r.SignerChain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("audit: checkpoint signer certificate %d: %w", i, err)
		}
		certs[i] = c
	}
	if err := verifySignature(certs[0].PublicKey, CheckpointDigest(r.Head, r.Seq-1), r.Signature); err != nil {
		return err
	}
	if len(roots) == 0 {
		return nil
	}
	pool := x509.NewCertPool()
	for _, c := range roots {
		pool.AddCert(c)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		CurrentTime:   r.Time,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("audit: checkpoint signer: %w", err)
	}
	return nil
}

func verifySignature(pub crypto.PublicKey, digest, sig []byte) error {
	ok := false
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		ok = ecdsa.VerifyASN1(k, digest, sig)
	case *rsa.PublicKey:
		ok = rsa.VerifyPKCS1v15(k, crypto.SHA256, digest, sig) == nil ||
			rsa.VerifyPSS(k, crypto.SHA256, digest, sig, nil) == nil
	case ed25519.PublicKey:
		ok = ed25519.Verify(k, digest, sig)
	default:
		return fmt.Errorf("audit: checkpoint signed with unsupported key type %T", pub)
	}
	if !ok {
		return errors.New("audit: checkpoint signature does not verify")
	}
	return nil
}

// signCheckpoint builds the checkpoint that follows the record (seq-1, head).
func signCheckpoint(ctx context.Context, s Signer, head string, seq uint64) (Record, error) {
	sig, chain, err := s.SignCheckpoint(ctx, CheckpointDigest(head, seq-1))
	if err != nil {
		return Record{}, fmt.Errorf("audit: signing checkpoint: %w", err)
	}
	if len(chain) == 0 {
		return Record{}, errors.New("audit: signing checkpoint: signer returned no certificate")
	}
	r := Record{Kind: KindCheckpoint, Head: head, Signature: sig}
	for _, c := range chain {
		r.SignerChain = append(r.SignerChain, c.Raw)
	}
	return r, nil
}
