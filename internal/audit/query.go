package audit

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"iter"
	"os"
	"slices"
	"strings"
	"time"
)

// Filter selects records. Its conditions all have to hold; zero fields
// select everything.
type Filter struct {
	// SPIFFEID matches issuances to that ID and denials claiming it.
	SPIFFEID  string
	Namespace string
	// Serial matches an issuance's serial, hex, in any case.
	Serial string
	// Since (inclusive) and Until (exclusive) bound the record time.
	Since, Until time.Time
	// Denied selects denials only.
	Denied bool
	// ValidAt selects issuances whose certificate is valid at that time:
	// NotBefore <= ValidAt < NotAfter.
	ValidAt time.Time
	// Kinds, if not empty, selects those kinds only.
	Kinds []Kind
	// Limit stops after that many records; 0 means no limit.
	Limit int
}

// Match reports whether r satisfies f, Limit aside.
func (f Filter) Match(r Record) bool {
	switch {
	case len(f.Kinds) > 0 && !slices.Contains(f.Kinds, r.Kind),
		f.Denied && r.Kind != KindDenied,
		f.SPIFFEID != "" && r.SPIFFEID != f.SPIFFEID && r.ClaimedID != f.SPIFFEID,
		f.Namespace != "" && r.Namespace != f.Namespace,
		f.Serial != "" && !strings.EqualFold(r.Serial, f.Serial),
		!f.Since.IsZero() && r.Time.Before(f.Since),
		!f.Until.IsZero() && !r.Time.Before(f.Until):
		return false
	}
	if !f.ValidAt.IsZero() {
		return r.Kind == KindIssued && !f.ValidAt.Before(r.NotBefore) && f.ValidAt.Before(r.NotAfter)
	}
	return true
}

// prefilter rejects most non-matching lines without decoding them. It may
// let non-matching lines through, never the reverse: it relies only on
// facts of the canonical encoding (the header layout, and that a field
// with value v appears as ,"name":<v encoded>, which no string value can
// contain because quotes inside strings are escaped).
type prefilter struct {
	kinds        map[Kind]bool // nil: any
	since, until time.Time
	validAt      time.Time
	anyOf        [][]byte // at least one must occur
	allOf        [][]byte // all must occur
}

func newPrefilter(f Filter) *prefilter {
	p := &prefilter{since: f.Since, until: f.Until, validAt: f.ValidAt}
	narrow := func(ks ...Kind) {
		next := make(map[Kind]bool)
		for _, k := range ks {
			if p.kinds == nil || p.kinds[k] {
				next[k] = true
			}
		}
		p.kinds = next
	}
	if len(f.Kinds) > 0 {
		narrow(f.Kinds...)
	}
	if f.Denied {
		narrow(KindDenied)
	}
	if !f.ValidAt.IsZero() {
		narrow(KindIssued)
	}
	if f.SPIFFEID != "" {
		v, _ := json.Marshal(f.SPIFFEID)
		p.anyOf = [][]byte{
			append([]byte(`,"spiffe_id":`), v...),
			append([]byte(`,"claimed_id":`), v...),
		}
	}
	if f.Namespace != "" {
		v, _ := json.Marshal(f.Namespace)
		p.allOf = append(p.allOf, append([]byte(`,"namespace":`), v...))
	}
	return p
}

func (p *prefilter) pass(line []byte) bool {
	if p.kinds != nil || !p.since.IsZero() || !p.until.IsZero() {
		_, t, kind, ok := parseHeader(line)
		if !ok {
			return true // not canonical: let the decoder judge it
		}
		if p.kinds != nil && !p.kinds[kind] ||
			!p.since.IsZero() && t.Before(p.since) ||
			!p.until.IsZero() && !t.Before(p.until) {
			return false
		}
	}
	for _, n := range p.allOf {
		if !bytes.Contains(line, n) {
			return false
		}
	}
	if !p.validAt.IsZero() {
		nb, ok := rawTime(line, fieldNotBefore)
		if ok && p.validAt.Before(nb) {
			return false
		}
		// Without not_after a record is valid at no time.
		na, ok := rawTime(line, fieldNotAfter)
		if ok && !p.validAt.Before(na) {
			return false
		}
	}
	if len(p.anyOf) == 0 {
		return true
	}
	for _, n := range p.anyOf {
		if bytes.Contains(line, n) {
			return true
		}
	}
	return false
}

// Query returns the records matching f in ledger order, which is also time
// order. A failure ends the sequence with a non-nil error. Query reads what
// is on disk and trusts it; Verify is what checks it.
func (l *Ledger) Query(ctx context.Context, f Filter) iter.Seq2[Record, error] {
	return func(yield func(Record, error) bool) {
		err := l.each(ctx, f, func(r *Record, _ []byte) bool { return yield(*r, nil) })
		if err != nil {
			yield(Record{}, err)
		}
	}
}

// Export writes the records matching f as JSON lines, exactly as stored, so
// an export of a whole ledger verifies like the ledger. It returns the
// number of records written.
func (l *Ledger) Export(ctx context.Context, w io.Writer, f Filter) (int, error) {
	bw := bufio.NewWriterSize(w, 256<<10)
	n := 0
	write := func(line []byte) bool {
		if _, err := bw.Write(line); err != nil {
			return false // Flush reports it
		}
		bw.WriteByte('\n')
		n++
		return true
	}
	var err error
	if f.matchesAll() {
		// Nothing to decide per record: copy lines without decoding them.
		v := l.acquire()
		err = l.scan(ctx, v, f, func(_ segment, _ int, line []byte) (bool, error) {
			return write(line) && (f.Limit <= 0 || n < f.Limit), nil
		})
		l.release()
	} else {
		err = l.each(ctx, f, func(_ *Record, line []byte) bool { return write(line) })
	}
	if err == nil {
		err = bw.Flush() // also reports earlier write errors, which bufio keeps
	}
	if err != nil {
		return n, fmt.Errorf("audit: export: %w", err)
	}
	return n, nil
}

// matchesAll reports whether f selects every record, Limit aside.
func (f Filter) matchesAll() bool {
	return f.SPIFFEID == "" && f.Namespace == "" && f.Serial == "" && f.Since.IsZero() && f.Until.IsZero() &&
		!f.Denied && f.ValidAt.IsZero() && len(f.Kinds) == 0
}

// each calls fn with every record matching f, and its stored line, until fn
// returns false or the limit is reached.
func (l *Ledger) each(ctx context.Context, f Filter, fn func(r *Record, line []byte) bool) error {
	v := l.acquire()
	defer l.release()
	n := 0
	emit := func(r *Record, line []byte) bool {
		if !f.Match(*r) {
			return true
		}
		n++
		return fn(r, line) && (f.Limit <= 0 || n < f.Limit)
	}
	if f.Serial != "" {
		return l.eachSerial(ctx, v, f, emit)
	}
	return l.scan(ctx, v, f, func(s segment, lineNo int, line []byte) (bool, error) {
		r, err := decodeLine(line)
		if err != nil {
			return false, fmt.Errorf("audit: %s line %d: %w", s.name(), lineNo, err)
		}
		return emit(&r, line), nil
	})
}

// scan calls fn with every complete line of the view that f's prefilter
// lets through, until fn returns false or an error. Segments outside f's
// time range, or holding no certificate valid at f.ValidAt, are skipped
// unread.
func (l *Ledger) scan(ctx context.Context, v view, f Filter, fn func(s segment, lineNo int, line []byte) (bool, error)) error {
	pf := newPrefilter(f)
	for _, s := range v.segs {
		if !f.Since.IsZero() && !s.maxTime.IsZero() && s.maxTime.Before(f.Since) ||
			!f.Until.IsZero() && !s.minTime.IsZero() && !s.minTime.Before(f.Until) ||
			!f.ValidAt.IsZero() && !s.mayHoldValid(f.ValidAt) {
			continue
		}
		more, err := l.scanSegment(ctx, s, pf, fn)
		if err != nil || !more {
			return err
		}
	}
	return nil
}

func (l *Ledger) scanSegment(ctx context.Context, s segment, pf *prefilter, fn func(segment, int, []byte) (bool, error)) (bool, error) {
	file, err := l.openSegment(s)
	if err != nil {
		return false, err
	}
	defer file.Close()
	lr := newLineReader(io.NewSectionReader(file, 0, s.size), 256<<10)
	for i := 0; ; i++ {
		if i%4096 == 0 {
			if err := ctx.Err(); err != nil {
				return false, fmt.Errorf("audit: query: %w", err)
			}
		}
		line, _, complete, err := lr.next()
		if err == io.EOF {
			return true, nil
		}
		if err != nil {
			return false, fmt.Errorf("audit: reading %s line %d: %w", s.name(), lr.num+1, err)
		}
		if !complete || !pf.pass(line) {
			continue
		}
		if more, err := fn(s, lr.num, line); err != nil || !more {
			return false, err
		}
	}
}

// eachSerial serves a serial lookup from the index.
func (l *Ledger) eachSerial(ctx context.Context, v view, f Filter, emit func(*Record, []byte) bool) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("audit: query: %w", err)
	}
	l.mu.Lock()
	locs := slices.Clone(l.serials[strings.ToLower(f.Serial)])
	l.mu.Unlock()
	files := make(map[uint64]*os.File)
	defer func() {
		for _, file := range files {
			file.Close()
		}
	}()
	for _, lc := range locs {
		i := slices.IndexFunc(v.segs, func(s segment) bool { return s.first == lc.seg })
		if i < 0 || lc.off >= v.segs[i].size {
			continue // pruned, or written after the view was taken
		}
		s := v.segs[i]
		file := files[s.first]
		if file == nil {
			var err error
			if file, err = l.openSegment(s); err != nil {
				return err
			}
			files[s.first] = file
		}
		line, err := readLineAt(file, lc.off, s.size)
		if err != nil {
			return fmt.Errorf("audit: %s: %w", s.name(), err)
		}
		r, err := decodeLine(line)
		if err != nil {
			return fmt.Errorf("audit: %s offset %d: %w", s.name(), lc.off, err)
		}
		if !emit(&r, line) {
			return nil
		}
	}
	return nil
}

// Stats summarises a ledger.
type Stats struct {
	// At is the time ValidByRoot refers to.
	At time.Time
	// Issued counts issuances per SPIFFE ID.
	Issued map[string]int
	// Denied counts denials per reason.
	Denied map[string]int
	// ValidByRoot counts certificates valid at At per root fingerprint:
	// the live leaves each root still covers, which is what a root
	// rotation waits on.
	ValidByRoot map[string]int
}

// Stats counts issuances, denials and certificates valid at the given time
// over the whole ledger.
func (l *Ledger) Stats(ctx context.Context, at time.Time) (Stats, error) {
	st := Stats{At: at, Issued: map[string]int{}, Denied: map[string]int{}, ValidByRoot: map[string]int{}}
	count := func(r *Record) {
		switch r.Kind {
		case KindIssued:
			st.Issued[r.SPIFFEID]++
			if !at.Before(r.NotBefore) && at.Before(r.NotAfter) {
				st.ValidByRoot[r.RootFingerprint]++
			}
		case KindDenied:
			st.Denied[r.Reason]++
		}
	}
	v := l.acquire()
	defer l.release()
	err := l.scan(ctx, v, Filter{Kinds: []Kind{KindIssued, KindDenied}}, func(s segment, lineNo int, line []byte) (bool, error) {
		// Most records need only a few fields, read straight from the
		// line; anything unusual goes through the decoder.
		if r, ok := statsFields(line); ok {
			count(&r)
			return true, nil
		}
		r, err := decodeLine(line)
		if err != nil {
			return false, fmt.Errorf("audit: %s line %d: %w", s.name(), lineNo, err)
		}
		count(&r)
		return true, nil
	})
	return st, err
}

// statsFields reads the fields Stats needs from a canonical line.
func statsFields(line []byte) (Record, bool) {
	_, _, kind, ok := parseHeader(line)
	if !ok {
		return Record{}, false
	}
	r := Record{Kind: kind}
	var fields []rawField
	switch kind {
	case KindIssued:
		fields = []rawField{{fieldSPIFFEID, &r.SPIFFEID}, {fieldRootFP, &r.RootFingerprint}}
		var okB, okA bool
		if r.NotBefore, okB = rawTime(line, fieldNotBefore); !okB {
			return r, false
		}
		if r.NotAfter, okA = rawTime(line, fieldNotAfter); !okA {
			return r, false
		}
	case KindDenied:
		fields = []rawField{{fieldReason, &r.Reason}}
	default:
		return r, false
	}
	for _, f := range fields {
		v, ok := rawString(line, f.name)
		if !ok {
			return r, false
		}
		*f.dst = string(v)
	}
	return r, true
}

type rawField struct {
	name []byte
	dst  *string
}

// Merged is a record found by MergeQuery and the index of its ledger.
type Merged struct {
	Ledger int
	Record Record
}

// MergeQuery queries several ledgers, typically one per replica, and
// returns their matches in time order; ties go by ledger index, then seq.
// f.Limit applies to the merged sequence.
func MergeQuery(ctx context.Context, ledgers []*Ledger, f Filter) iter.Seq2[Merged, error] {
	return func(yield func(Merged, error) bool) {
		type head struct {
			next func() (Record, error, bool)
			rec  Record
			ok   bool
		}
		heads := make([]head, len(ledgers))
		for i, l := range ledgers {
			next, stop := iter.Pull2(l.Query(ctx, f))
			defer stop()
			heads[i].next = next
			rec, err, ok := next()
			if err != nil {
				yield(Merged{}, err)
				return
			}
			heads[i].rec, heads[i].ok = rec, ok
		}
		for n := 0; f.Limit <= 0 || n < f.Limit; n++ {
			best := -1
			for i, h := range heads {
				if h.ok && (best < 0 || h.rec.Time.Before(heads[best].rec.Time)) {
					best = i
				}
			}
			if best < 0 {
				return
			}
			if !yield(Merged{Ledger: best, Record: heads[best].rec}, nil) {
				return
			}
			rec, err, ok := heads[best].next()
			if err != nil {
				yield(Merged{}, err)
				return
			}
			heads[best].rec, heads[best].ok = rec, ok
		}
	}
}
