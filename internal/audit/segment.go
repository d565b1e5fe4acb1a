package audit

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"
)

const (
	segPrefix = "seg-"
	segSuffix = ".log"
	// maxLine bounds what readers accept as one line. The writer refuses
	// records above maxRecord, so only damage or tampering can exceed it.
	maxLine   = 1 << 20
	maxRecord = 64 << 10
)

// segName is the file name of the segment whose first record has seq first.
// Zero padding makes name order the seq order.
func segName(first uint64) string {
	return fmt.Sprintf("%s%020d%s", segPrefix, first, segSuffix)
}

func parseSegName(name string) (uint64, bool) {
	if len(name) != len(segPrefix)+20+len(segSuffix) ||
		name[:len(segPrefix)] != segPrefix || name[len(name)-len(segSuffix):] != segSuffix {
		return 0, false
	}
	n, err := strconv.ParseUint(name[len(segPrefix):len(segPrefix)+20], 10, 64)
	return n, err == nil && n > 0
}

// segment is what the in-memory index knows about one segment file.
type segment struct {
	first    uint64 // from the file name
	lastSeq  uint64 // of the last record that parsed
	count    int    // lines
	minTime  time.Time
	maxTime  time.Time
	size     int64 // bytes readers may read
	lastKind Kind
	lastOff  int64 // offset of the last line
	// maxNotAfter is the latest NotAfter of the segment's issuances (zero
	// if none): a ValidAt query at or past it skips the segment unread.
	maxNotAfter time.Time
}

// noteIssued records the NotAfter of one issuance in the segment.
func (s *segment) noteIssued(notAfter time.Time) {
	if notAfter.After(s.maxNotAfter) {
		s.maxNotAfter = notAfter
	}
}

// mayHoldValid reports whether an issuance in s may be valid at at.
func (s *segment) mayHoldValid(at time.Time) bool { return at.Before(s.maxNotAfter) }

func (s *segment) name() string { return segName(s.first) }

// add updates the index entry with one record.
func (s *segment) add(seq uint64, t time.Time, kind Kind, off int64, n int) {
	if seq != 0 {
		s.lastSeq = seq
	}
	if !t.IsZero() {
		if s.minTime.IsZero() || t.Before(s.minTime) {
			s.minTime = t
		}
		if t.After(s.maxTime) {
			s.maxTime = t
		}
	}
	s.count++
	s.lastKind = kind
	s.lastOff = off
	s.size = off + int64(n)
}

// loc is where a record lives: the segment (by first seq) and byte offset.
type loc struct {
	seg uint64
	off int64
}

var errLineTooLong = fmt.Errorf("line longer than %d bytes", maxLine)

// lineReader yields the lines of a segment with their offsets and numbers.
type lineReader struct {
	br   *bufio.Reader
	off  int64 // offset of the next line
	num  int   // number of the last line returned, 1-based
	long []byte
}

func newLineReader(r io.Reader, bufSize int) *lineReader {
	return &lineReader{br: bufio.NewReaderSize(r, bufSize)}
}

// next returns the next line without its newline. complete is false for a
// final fragment that has no newline. The line is valid until the next call.
// At the end it returns io.EOF.
func (lr *lineReader) next() (line []byte, off int64, complete bool, err error) {
	off = lr.off
	b, err := lr.br.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		lr.long = append(lr.long[:0], b...)
		for errors.Is(err, bufio.ErrBufferFull) {
			if len(lr.long) > maxLine {
				return nil, off, false, errLineTooLong
			}
			b, err = lr.br.ReadSlice('\n')
			lr.long = append(lr.long, b...)
		}
		b = lr.long
	}
	switch {
	case err == io.EOF && len(b) == 0:
		return nil, off, false, io.EOF
	case err != nil && err != io.EOF:
		return nil, off, false, err
	}
	lr.off += int64(len(b))
	lr.num++
	if n := len(b); n > 0 && b[n-1] == '\n' {
		return b[:n-1], off, true, nil
	}
	return b, off, false, nil
}

var (
	hdrSeq    = []byte(`{"seq":`)
	hdrTime   = []byte(`,"time":"`)
	hdrKind   = []byte(`","kind":"`)
	hdrSerial = []byte(`,"serial":"`)
)

// parseHeader reads seq, time and kind from the front of a canonical line
// without decoding the rest, which is what makes opening and scanning large
// ledgers cheap. ok is false when the line does not start as the writer
// writes lines; callers then fall back to a full decode.
func parseHeader(line []byte) (seq uint64, t time.Time, kind Kind, ok bool) {
	if !bytes.HasPrefix(line, hdrSeq) {
		return 0, t, "", false
	}
	i := len(hdrSeq)
	j := i
	for j < len(line) && j-i < 20 && line[j] >= '0' && line[j] <= '9' {
		j++
	}
	seq, err := strconv.ParseUint(string(line[i:j]), 10, 64)
	if err != nil {
		return 0, t, "", false
	}
	rest := line[j:]
	if !bytes.HasPrefix(rest, hdrTime) {
		return 0, t, "", false
	}
	rest = rest[len(hdrTime):]
	q := bytes.IndexByte(rest, '"')
	if q < 0 {
		return 0, t, "", false
	}
	if t, err = time.Parse(time.RFC3339Nano, string(rest[:q])); err != nil {
		return 0, t, "", false
	}
	rest = rest[q:]
	if !bytes.HasPrefix(rest, hdrKind) {
		return 0, t, "", false
	}
	rest = rest[len(hdrKind):]
	q = bytes.IndexByte(rest, '"')
	if q < 0 {
		return 0, t, "", false
	}
	switch k := Kind(rest[:q]); k {
	case KindIssued, KindDenied, KindAdmin, KindCheckpoint:
		return seq, t, k, true
	}
	return 0, t, "", false
}

// rawSerial returns the serial of an issuance line in lower case, or ""
// when it has none or it is escaped (never the case for hex).
func rawSerial(line []byte) string {
	v, ok := rawString(line, hdrSerial)
	if !ok {
		return ""
	}
	return string(bytes.ToLower(v))
}

var (
	fieldSPIFFEID  = []byte(`,"spiffe_id":"`)
	fieldNotBefore = []byte(`,"not_before":"`)
	fieldNotAfter  = []byte(`,"not_after":"`)
	fieldRootFP    = []byte(`,"root_fingerprint":"`)
	fieldReason    = []byte(`,"reason":"`)
)

// rawString returns the value of a string field of a canonical line given
// as `,"name":"`, or "" when the line has no such field. ok is false when
// the value is escaped, so that only a decoder can read it. The needle
// cannot match inside a string value: quotes there are escaped.
func rawString(line, field []byte) (val []byte, ok bool) {
	i := bytes.Index(line, field)
	if i < 0 {
		return nil, true
	}
	rest := line[i+len(field):]
	q := bytes.IndexByte(rest, '"')
	if q < 0 || bytes.IndexByte(rest[:q], '\\') >= 0 {
		return nil, false
	}
	return rest[:q], true
}

// rawTime is rawString for a time field; a missing field is the zero time.
// issuedNotAfter is the NotAfter of an issuance's line. A line whose
// NotAfter cannot be read counts as valid forever, so that no ValidAt
// query ever skips its segment.
func issuedNotAfter(line []byte) time.Time {
	if t, ok := rawTime(line, fieldNotAfter); ok {
		return t
	}
	var r Record
	if json.Unmarshal(line, &r) == nil && !r.NotAfter.IsZero() {
		return r.NotAfter
	}
	return farFuture
}

// farFuture is later than any certificate's NotAfter.
var farFuture = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)

func rawTime(line, field []byte) (time.Time, bool) {
	v, ok := rawString(line, field)
	if !ok || v == nil {
		return time.Time{}, ok
	}
	t, err := time.Parse(time.RFC3339Nano, string(v))
	return t, err == nil
}

// scanResult is what opening learns from one segment file.
type scanResult struct {
	seg segment
	// tornAt is the offset of a final fragment without a newline, or -1.
	tornAt int64
	// lastCP is the seq and time of the last checkpoint in the segment.
	lastCPSeq  uint64
	lastCPTime time.Time
}

// scanSegment indexes one segment file, adding its issuances to serials.
// Lines that do not parse are counted and skipped: reporting them is
// Verify's job.
func scanSegment(path string, first uint64, serials map[string][]loc) (scanResult, error) {
	res := scanResult{seg: segment{first: first}, tornAt: -1}
	f, err := os.Open(path)
	if err != nil {
		return res, fmt.Errorf("audit: %w", err)
	}
	defer f.Close()
	lr := newLineReader(f, 1<<20)
	for {
		line, off, complete, err := lr.next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return res, fmt.Errorf("audit: reading %s: %w", path, err)
		}
		if !complete {
			res.tornAt = off
			res.seg.size = lr.off
			break
		}
		seq, t, kind, ok := parseHeader(line)
		if !ok {
			var r Record
			if json.Unmarshal(line, &r) == nil {
				seq, t, kind = r.Seq, r.Time, r.Kind
			}
		}
		res.seg.add(seq, t, kind, off, len(line)+1)
		switch kind {
		case KindCheckpoint:
			res.lastCPSeq, res.lastCPTime = seq, t
		case KindIssued:
			if s := rawSerial(line); s != "" {
				serials[s] = append(serials[s], loc{seg: first, off: off})
			}
			res.seg.noteIssued(issuedNotAfter(line))
		}
	}
	return res, nil
}

// readLineAt reads the complete line that starts at off, without its
// newline, from a segment whose readable size is limit.
func readLineAt(f io.ReaderAt, off, limit int64) ([]byte, error) {
	for size := int64(4096); ; size *= 2 {
		n := min(size, limit-off)
		if n <= 0 {
			return nil, fmt.Errorf("no record at offset %d", off)
		}
		buf := make([]byte, n)
		m, err := f.ReadAt(buf, off)
		if i := bytes.IndexByte(buf[:m], '\n'); i >= 0 {
			return buf[:i], nil
		}
		if err != nil && err != io.EOF {
			return nil, err
		}
		if int64(m) < n || n == limit-off {
			return nil, fmt.Errorf("no complete record at offset %d", off)
		}
		if n > maxLine {
			return nil, errLineTooLong
		}
	}
}
