package audit_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/audit"
)

func TestIssuance(t *testing.T) {
	authority := catest.NewAuthority(t, nil)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	issued, err := authority.SignKey(t.Context(), key.Public(), id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf := issued.Leaf()

	r, err := audit.Issuance(issued.Chain, issued.Root)
	if err != nil {
		t.Fatal(err)
	}
	spki := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
	want := audit.Record{
		Kind:              audit.KindIssued,
		Serial:            leaf.SerialNumber.Text(16),
		SPIFFEID:          id.String(),
		KeyFingerprint:    hex.EncodeToString(spki[:]),
		KeyType:           "ecdsa-p256",
		NotBefore:         leaf.NotBefore,
		NotAfter:          leaf.NotAfter,
		IssuerFingerprint: ca.Fingerprint(issued.Chain[1]),
		RootFingerprint:   ca.Fingerprint(issued.Root),
	}
	if !recordsEqual(r, want) {
		t.Errorf("Issuance =\n%+v\nwant\n%+v", r, want)
	}

	if _, err := audit.Issuance(nil, issued.Root); err == nil {
		t.Error("Issuance accepted an empty chain")
	}
	if _, err := audit.Issuance(issued.Chain, nil); err == nil {
		t.Error("Issuance accepted a missing root")
	}
}

func recordsEqual(a, b audit.Record) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}

func TestKeyTypeOf(t *testing.T) {
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	r2048, _ := rsa.GenerateKey(rand.Reader, 2048)
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	for _, tt := range []struct {
		pub  crypto.PublicKey
		want string
	}{
		{p256.Public(), "ecdsa-p256"},
		{p384.Public(), "ecdsa-p384"},
		{r2048.Public(), "rsa-2048"},
		{edPub, "ed25519"},
		{"not a key", "unknown"},
	} {
		if got := audit.KeyTypeOf(tt.pub); got != tt.want {
			t.Errorf("KeyTypeOf(%T) = %q, want %q", tt.pub, got, tt.want)
		}
	}
}

// TestStoredForm pins the format: one line per record, fields in a fixed
// order, hash over the encoding without hash, times in UTC.
func TestStoredForm(t *testing.T) {
	dir := t.TempDir()
	l := start(t, audit.Config{Dir: dir})
	berlin := time.FixedZone("CET", 3600)
	in := gen(0)
	in.NotBefore = in.NotBefore.In(berlin)
	in.Detail = `quotes " and <html> & newlines` + "\n"
	first := mustAppend(t, l, in)
	second := mustAppend(t, l, gen(7))
	l.Close()

	ls := lines(t, segments(t, dir)[0])
	if len(ls) != 2 {
		t.Fatalf("segment holds %d lines, want 2", len(ls))
	}
	for i, r := range []audit.Record{first, second} {
		enc, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ls[i], enc) {
			t.Errorf("line %d =\n%s\nwant the record's encoding\n%s", i+1, ls[i], enc)
		}
		canon, err := r.Canonical()
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(canon, []byte(`"hash"`)) {
			t.Errorf("canonical bytes contain the hash: %s", canon)
		}
		if sum := sha256.Sum256(canon); hex.EncodeToString(sum[:]) != r.Hash {
			t.Errorf("record %d: hash %s is not the SHA-256 of its canonical bytes", r.Seq, r.Hash)
		}
	}
	if !strings.HasPrefix(string(ls[0]), `{"seq":1,"time":"`) {
		t.Errorf("line does not start with seq and time: %s", ls[0])
	}
	if first.Prev != strings.Repeat("0", 64) || second.Prev != first.Hash {
		t.Errorf("prev of seq 1 = %s, of seq 2 = %s; want zeros and %s", first.Prev, second.Prev, first.Hash)
	}
	if first.NotBefore.Location() != time.UTC || !first.NotBefore.Equal(in.NotBefore) {
		t.Errorf("not_before stored as %v, want %v in UTC", first.NotBefore, in.NotBefore)
	}
	if !bytes.Contains(ls[0], []byte(`"not_before":"`+in.NotBefore.UTC().Format(time.RFC3339Nano)+`"`)) {
		t.Errorf("not_before not in UTC: %s", ls[0])
	}
	if bytes.Contains(ls[0], []byte("reason")) || bytes.Contains(ls[1], []byte("serial")) {
		t.Error("empty fields are stored")
	}
}

func TestCheckpointDigest(t *testing.T) {
	head := strings.Repeat("ab", 32)
	sum := sha256.Sum256([]byte("meshca-audit-checkpoint-v1\x00" + head + "\x00" + "42"))
	if got := audit.CheckpointDigest(head, 42); !bytes.Equal(got, sum[:]) {
		t.Errorf("CheckpointDigest = %x, want %x", got, sum)
	}
	if bytes.Equal(audit.CheckpointDigest(head, 42), audit.CheckpointDigest(head, 43)) {
		t.Error("the digest does not bind the seq")
	}
}

func TestAppendReturnsWhatIsStored(t *testing.T) {
	dir := t.TempDir()
	l := start(t, audit.Config{Dir: dir})
	var want []audit.Record
	for i := range 20 {
		want = append(want, mustAppend(t, l, gen(i)))
	}
	got := all(t, l, audit.Filter{})
	if len(got) != len(want) {
		t.Fatalf("Query returned %d records, want %d", len(got), len(want))
	}
	for i := range want {
		if !recordsEqual(got[i], want[i]) {
			t.Errorf("record %d read back as\n%+v\nappended as\n%+v", i+1, got[i], want[i])
		}
	}
}
