package audit

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/meshca/meshca/ca"
)

// Kind classifies a record.
type Kind string

// Record kinds. Callers append the first three; the ledger writes
// checkpoints itself.
const (
	KindIssued     Kind = "issued"
	KindDenied     Kind = "denied"
	KindAdmin      Kind = "admin"
	KindCheckpoint Kind = "checkpoint"
)

func (k Kind) valid() bool {
	switch k {
	case KindIssued, KindDenied, KindAdmin, KindCheckpoint:
		return true
	}
	return false
}

// zeroHash is the prev of a ledger's first record.
var zeroHash = strings.Repeat("0", 2*sha256.Size)

// Record is one ledger entry, stored as one JSON object per line.
//
// The field order below is the on-disk order and part of the format: the
// canonical bytes of a record are exactly what encoding/json's Marshal
// produces for it with Hash empty, and Marshal emits struct fields in
// declaration order, escapes strings the same way every time and writes
// times in RFC 3339 with nanoseconds. Do not reorder, rename or retype
// fields without a format version change.
type Record struct {
	Seq  uint64    `json:"seq,omitempty"`
	Time time.Time `json:"time,omitzero"`
	Kind Kind      `json:"kind,omitempty"`
	// Prev is the hash of the record before this one.
	Prev string `json:"prev,omitempty"`
	// Hash is the hex SHA-256 of this record's canonical bytes.
	Hash string `json:"hash,omitempty"`

	// Issuance.
	Serial         string `json:"serial,omitempty"` // lower-case hex
	SPIFFEID       string `json:"spiffe_id,omitempty"`
	Namespace      string `json:"namespace,omitempty"`
	ServiceAccount string `json:"service_account,omitempty"`
	PodName        string `json:"pod_name,omitempty"`
	PodUID         string `json:"pod_uid,omitempty"`
	NodeName       string `json:"node_name,omitempty"`
	ClusterID      string `json:"cluster_id,omitempty"`
	// TokenHash identifies the caller's token; the token itself is never
	// recorded.
	TokenHash         string    `json:"token_hash,omitempty"`
	KeyFingerprint    string    `json:"key_fingerprint,omitempty"`
	KeyType           string    `json:"key_type,omitempty"`
	NotBefore         time.Time `json:"not_before,omitzero"`
	NotAfter          time.Time `json:"not_after,omitzero"`
	IssuerFingerprint string    `json:"issuer_fingerprint,omitempty"`
	RootFingerprint   string    `json:"root_fingerprint,omitempty"`

	// Denial.
	Reason    string `json:"reason,omitempty"`
	ClaimedID string `json:"claimed_id,omitempty"`
	Detail    string `json:"detail,omitempty"`

	// Peer is the caller's network address, for issuances and denials.
	Peer string `json:"peer,omitempty"`

	// Admin action.
	Actor  string `json:"actor,omitempty"`
	Action string `json:"action,omitempty"`
	Target string `json:"target,omitempty"`
	Result string `json:"result,omitempty"`

	// Checkpoint: Head is the hash of the record before the checkpoint,
	// Signature covers CheckpointDigest(Head, Seq-1) and SignerChain holds
	// the signer's certificates in DER, leaf first.
	Head        string   `json:"head,omitempty"`
	Signature   []byte   `json:"signature,omitempty"`
	SignerChain [][]byte `json:"signer_chain,omitempty"`
}

// Canonical returns the bytes Hash is computed over: r encoded with Hash
// empty, hence left out.
func (r Record) Canonical() ([]byte, error) {
	r.Hash = ""
	b, err := json.Marshal(&r)
	if err != nil {
		return nil, fmt.Errorf("audit: encoding record: %w", err)
	}
	return b, nil
}

// seal sets r.Hash and returns r's line, newline included.
func seal(r *Record) ([]byte, error) {
	canon, err := r.Canonical()
	if err != nil {
		return nil, err
	}
	r.Hash = hashHex(canon)
	// Hash follows Prev in the encoding, so splicing it in after Prev gives
	// what a second Marshal would, at a fraction of the cost. Prev is
	// writer-made hex and needs no escaping.
	needle := []byte(`,"prev":"` + r.Prev + `"`)
	i := bytes.Index(canon, needle)
	if i < 0 {
		line, err := json.Marshal(r)
		if err != nil {
			return nil, fmt.Errorf("audit: encoding record: %w", err)
		}
		return append(line, '\n'), nil
	}
	end := i + len(needle)
	line := make([]byte, 0, len(canon)+len(r.Hash)+12)
	line = append(line, canon[:end]...)
	line = append(line, `,"hash":"`...)
	line = append(line, r.Hash...)
	line = append(line, '"')
	line = append(line, canon[end:]...)
	return append(line, '\n'), nil
}

// checkLine parses one stored line (without its newline) and checks that it
// is in canonical form and that its hash matches its content. It returns the
// record and, when the check fails, what is wrong.
func checkLine(line []byte) (Record, string) {
	var r Record
	if err := json.Unmarshal(line, &r); err != nil {
		return r, fmt.Sprintf("not a valid record: %v", err)
	}
	again, err := json.Marshal(&r)
	if err != nil {
		return r, fmt.Sprintf("record does not re-encode: %v", err)
	}
	// Anything Unmarshal tolerates but Marshal would not write — unknown or
	// duplicate fields, other spacing or escaping — changes the bytes
	// without touching the parsed fields, so it is caught here rather than
	// by the hash.
	if !bytes.Equal(again, line) {
		return r, "record is not in canonical form (edited outside meshca)"
	}
	if r.Hash == "" {
		return r, "record has no hash"
	}
	// The line is canonical, so without its hash field, which follows prev
	// and cannot be mistaken for part of a string value, it is exactly the
	// canonical bytes: no need to encode the record once more.
	h := sha256.New()
	if i := bytes.Index(line, []byte(`,"hash":"`+r.Hash+`"`)); i >= 0 {
		h.Write(line[:i])
		h.Write(line[i+len(r.Hash)+10:])
	} else {
		canon, err := r.Canonical()
		if err != nil {
			return r, err.Error()
		}
		h.Write(canon)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != r.Hash {
		return r, fmt.Sprintf("hash mismatch: content hashes to %s, record says %s", got, r.Hash)
	}
	return r, ""
}

// Issuance returns the issuance record of chain[0], a leaf issued through
// chain (leaf first, then the intermediates that signed it) under root. The
// caller adds what only it knows: namespace, service account, pod, token
// hash and peer.
func Issuance(chain []*x509.Certificate, root *x509.Certificate) (Record, error) {
	if len(chain) == 0 || chain[0] == nil {
		return Record{}, errors.New("audit: issuance without a certificate")
	}
	if root == nil {
		return Record{}, errors.New("audit: issuance without a root")
	}
	leaf := chain[0]
	issuer := root
	if len(chain) > 1 {
		issuer = chain[1]
	}
	r := Record{
		Kind:              KindIssued,
		Serial:            leaf.SerialNumber.Text(16),
		KeyFingerprint:    KeyFingerprint(leaf),
		KeyType:           KeyTypeOf(leaf.PublicKey),
		NotBefore:         leaf.NotBefore.UTC(),
		NotAfter:          leaf.NotAfter.UTC(),
		IssuerFingerprint: ca.Fingerprint(issuer),
		RootFingerprint:   ca.Fingerprint(root),
	}
	for _, u := range leaf.URIs {
		if u.Scheme == "spiffe" {
			r.SPIFFEID = u.String()
			break
		}
	}
	return r, nil
}

// KeyFingerprint is the hex SHA-256 of a certificate's SubjectPublicKeyInfo,
// which stays the same across certificates for one key.
func KeyFingerprint(c *x509.Certificate) string {
	return hashHex(c.RawSubjectPublicKeyInfo)
}

// KeyTypeOf names a public key's algorithm and size, such as "ecdsa-p256",
// "rsa-2048" or "ed25519".
func KeyTypeOf(pub crypto.PublicKey) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return "ecdsa-" + strings.ToLower(strings.ReplaceAll(k.Curve.Params().Name, "-", ""))
	case *rsa.PublicKey:
		return fmt.Sprintf("rsa-%d", k.N.BitLen())
	case ed25519.PublicKey:
		return "ed25519"
	}
	return "unknown"
}
