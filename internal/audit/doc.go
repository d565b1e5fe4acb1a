// Package audit is meshca's durable, tamper-evident, append-only ledger of
// every issued certificate, every denied request and every admin action.
//
// # Format
//
// A ledger is a directory (mode 0700) of segment files (0600) and two small
// state files:
//
//	seg-<first seq, 20 digits>.log  records, one JSON object per line
//	head.json                       seq and hash of the latest checkpoint
//	prune.json                      the pruned prefix, if any (see Prune)
//
// Each record carries a seq (1-based, contiguous), a time stamped by the
// writer, which never goes back, a kind (issued, denied, admin, checkpoint),
// prev — the previous record's hash, 64 zeros for seq 1 — and hash, the hex
// SHA-256 of the record's canonical bytes: its encoding/json encoding with
// hash empty, hence left out. encoding/json encodes a struct's fields in
// declaration order and escapes strings the same way every time, so the
// canonical bytes of a Record are fixed by its fields; a stored line is the
// same encoding with hash included after prev. Anyone can recompute the
// chain with a JSON library that reproduces that encoding, or with this
// package.
//
// Every CheckpointEvery records, every CheckpointInterval and at the end of
// every full segment the writer appends a checkpoint: a record whose head
// is the previous record's hash, signed by Config.Signer (the CA's signing
// intermediate) over CheckpointDigest, with the signer's chain. head.json
// then names it.
//
// # Durability
//
// Append returns only once its record has been written and fsynced. One
// writer goroutine (Run) takes every append queued at the time, writes them
// with one write and one fsync, and then answers all of them (group
// commit), so concurrency raises throughput instead of fsync count. If the
// write or fsync fails, every append of the batch gets ErrUnavailable and
// the segment is cut back to its last durable byte before the next batch,
// which continues the chain from the last durable record. (Only if cutting
// back fails as well and the process dies before the next batch can a
// refused record survive, whole and correctly chained.) A process killed
// mid-write leaves at most a torn final line, which was never acknowledged;
// New cuts it off. Records that were acknowledged are never lost to a crash
// of the process or, as far as fsync holds its promise, of the machine.
// Config.Mirror gets each batch only after its fsync.
//
// # What Verify detects, and what it cannot
//
// Verify detects, and locates to the segment, line and seq: a record
// edited in any way, including spacing or added fields (hash or canonical
// form); a record removed, duplicated or moved (seq and prev); a record
// edited and rehashed (the next record's prev, or, if the whole rest of the
// chain is rehashed, the next checkpoint's signature); records or whole
// segments cut off the end up to the checkpoint in head.json; a missing or
// renamed segment; an edited prune.json; a checkpoint whose signature does
// not verify, or, with VerifyOptions.Roots, whose signer does not chain to
// those roots.
//
// It cannot detect what an attacker able to rewrite the directory does
// consistently after the last checkpoint: records after it can be dropped
// or rewritten without a trace, and, with head.json rolled back to an older
// checkpoint, so can everything after that one. Without a Signer there are
// no checkpoints,
// so the whole chain can be recomputed and truncation goes unnoticed. A
// prefix of whole segments ending in a checkpoint can be removed and
// prune.json rewritten to match, which looks like a legitimate Prune;
// Report.PrunedThrough shows how much is gone. Shipping the Mirror stream
// or checkpoints off the machine closes these gaps. Verify trusts the
// clock behind record times only to never go back.
//
// Query, Stats and Export read what is on disk and trust it; run Verify to
// check it. One process at a time may write a ledger directory; others can
// read it with OpenReadOnly.
package audit
