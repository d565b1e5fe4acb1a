package vault

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// hashNames are the digests Transit signs prehashed, by its names. SHA-1
// is left out: nothing meshca signs may use it.
var hashNames = map[crypto.Hash]string{
	crypto.SHA224: "sha2-224",
	crypto.SHA256: "sha2-256",
	crypto.SHA384: "sha2-384",
	crypto.SHA512: "sha2-512",
}

// signer is one version of a Transit key. Every signature is made by Vault;
// the private key never leaves it.
type signer struct {
	s       *Store
	name    string // Transit key name
	version int
	pub     crypto.PublicKey
}

func (k *signer) Public() crypto.PublicKey { return k.pub }

// Sign asks Transit to sign digest with this signer's key version and
// verifies the signature before returning it. ECDSA signatures are ASN.1;
// RSA ones are PKCS #1 v1.5, or PSS when opts is *rsa.PSSOptions. rand is
// unused: Vault supplies its own randomness. Each call is bounded by the
// store's RequestTimeout, as crypto.Signer passes no context.
func (k *signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if opts == nil {
		return nil, fmt.Errorf("keystore/vault: signing with %s: no SignerOpts", k.name)
	}
	h := opts.HashFunc()
	alg, ok := hashNames[h]
	if !ok {
		return nil, fmt.Errorf("keystore/vault: signing with %s: unsupported digest %v", k.name, h)
	}
	if len(digest) != h.Size() {
		return nil, fmt.Errorf("keystore/vault: signing with %s: digest is %d bytes, want %d for %v", k.name, len(digest), h.Size(), h)
	}
	body := map[string]any{
		"input":          base64.StdEncoding.EncodeToString(digest),
		"prehashed":      true,
		"hash_algorithm": alg,
		"key_version":    k.version,
	}
	pss, isPSS := opts.(*rsa.PSSOptions)
	switch k.pub.(type) {
	case *ecdsa.PublicKey:
		body["marshaling_algorithm"] = "asn1"
	case *rsa.PublicKey:
		if isPSS {
			body["signature_algorithm"] = "pss"
			body["salt_length"] = saltLength(pss.SaltLength)
		} else {
			body["signature_algorithm"] = "pkcs1v15"
		}
	}

	start := k.s.clock.Now()
	sig, err := k.sign(body)
	if err == nil {
		err = k.verify(digest, sig, h, pss)
	}
	k.s.metrics.signLatency.Observe(k.s.clock.Since(start).Seconds())
	if err != nil {
		k.s.metrics.signs.WithLabelValues("error").Inc()
		return nil, err
	}
	k.s.metrics.signs.WithLabelValues("ok").Inc()
	return sig, nil
}

func (k *signer) sign(body map[string]any) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), k.s.timeout)
	defer cancel()
	op := fmt.Sprintf("signing with Transit key %s version %d", k.name, k.version)
	if err := k.s.ready(ctx); err != nil {
		return nil, err
	}
	var resp struct {
		Data struct {
			Signature string `json:"signature"`
		} `json:"data"`
	}
	tok := k.s.client.Token()
	err := k.s.write(ctx, k.s.mount+"/sign/"+k.name, body, &resp)
	if err != nil && expiredToken(err) {
		// The token ran out before Run replaced it (a stalled process, a
		// late renewal): log in again once and retry, rather than fail a
		// signature the credentials still allow.
		if lerr := k.s.reloginUnless(ctx, tok); lerr == nil {
			err = k.s.write(ctx, k.s.mount+"/sign/"+k.name, body, &resp)
		}
	}
	if err != nil {
		return nil, wrap(op, err)
	}
	// Transit prefixes the signature with the key version that made it.
	want := "vault:v" + strconv.Itoa(k.version) + ":"
	enc, ok := strings.CutPrefix(resp.Data.Signature, want)
	if !ok {
		return nil, fmt.Errorf("keystore/vault: %s: Vault's signature lacks the prefix %q", op, want)
	}
	sig, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		return nil, fmt.Errorf("keystore/vault: %s: signature: %w", op, err)
	}
	return sig, nil
}

// verify guards against a signature made with another key or scheme than
// asked for: it would otherwise surface only when a relying party rejects
// a certificate.
func (k *signer) verify(digest, sig []byte, h crypto.Hash, pss *rsa.PSSOptions) error {
	var err error
	switch pub := k.pub.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest, sig) {
			err = errors.New("invalid ECDSA signature")
		}
	case *rsa.PublicKey:
		if pss != nil {
			err = rsa.VerifyPSS(pub, h, digest, sig, pss)
		} else {
			err = rsa.VerifyPKCS1v15(pub, h, digest, sig)
		}
	}
	if err != nil {
		return fmt.Errorf("keystore/vault: signature from Transit key %s version %d does not verify: %w", k.name, k.version, err)
	}
	return nil
}

// saltLength maps rsa.PSSOptions.SaltLength to Transit's salt_length.
func saltLength(n int) string {
	switch n {
	case rsa.PSSSaltLengthAuto:
		return "auto"
	case rsa.PSSSaltLengthEqualsHash:
		return "hash"
	default:
		return strconv.Itoa(n)
	}
}
