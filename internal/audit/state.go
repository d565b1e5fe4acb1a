package audit

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/meshca/meshca/internal/atomicfile"
)

const (
	headFile  = "head.json"
	pruneFile = "prune.json"
)

// headState names the latest durable checkpoint. It lives outside the
// segments so that cutting records off the end of the ledger, which leaves a
// perfectly consistent shorter chain, still shows: Verify requires the
// ledger to reach this checkpoint.
type headState struct {
	Seq  uint64 `json:"seq"`
	Hash string `json:"hash"`
}

// pruneState records the pruned prefix: every record up to and including
// ThroughSeq is gone, and the first remaining record must carry ThroughHash
// as its prev. Checkpoint is the last pruned record, kept whole: its
// signature vouches for the chain the remaining records continue.
type pruneState struct {
	ThroughSeq  uint64 `json:"through_seq"`
	ThroughHash string `json:"through_hash"`
	Checkpoint  Record `json:"checkpoint"`
}

// check reports what is wrong with a prune state, or "" when its checkpoint
// is whole, signed, and the one the state claims.
func (p *pruneState) check(roots []*x509.Certificate) string {
	cp := p.Checkpoint
	canon, err := cp.Canonical()
	if err != nil {
		return err.Error()
	}
	if got := hashHex(canon); got != cp.Hash {
		return fmt.Sprintf("checkpoint hash mismatch: content hashes to %s, record says %s", got, cp.Hash)
	}
	if cp.Seq != p.ThroughSeq || cp.Hash != p.ThroughHash {
		return fmt.Sprintf("pruned through seq %d hash %s, but the checkpoint is seq %d hash %s",
			p.ThroughSeq, p.ThroughHash, cp.Seq, cp.Hash)
	}
	if err := VerifyCheckpoint(cp, roots); err != nil {
		return err.Error()
	}
	return ""
}

// readState decodes dir/name into v. A missing file is reported as
// (false, nil).
func readState(dir, name string, v any) (bool, error) {
	data, err := os.ReadFile(filepath.Join(dir, name))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("audit: %w", err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return true, fmt.Errorf("audit: %s is corrupt: %w", name, err)
	}
	return true, nil
}

func writeState(dir, name string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("audit: %s: %w", name, err)
	}
	if err := atomicfile.Write(filepath.Join(dir, name), append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	return nil
}

func hashHex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}
