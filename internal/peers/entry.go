package peers

import (
	"bytes"
	"cmp"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"time"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/sds"
)

// format is the version of the entry encoding. A reader that meets another
// cannot tell what the entry's replica holds, so its gates stay closed.
const format = 1

// maxNACK bounds a published NACK message: proxies choose them, and the
// whole ConfigMap must stay under 1 MiB.
const maxNACK = 256

// wire is one replica's entry as stored: JSON, gzipped, under the replica's
// key in the ConfigMap's binaryData. Fingerprints and SPIFFE IDs are stored
// once and referred to by index; times are Unix seconds (certificates
// carry no finer ones). The keys are short because there are thousands of
// each.
type wire struct {
	Format    int           `json:"format"`
	UpdatedAt time.Time     `json:"updatedAt"`
	Roots     []string      `json:"roots,omitempty"`
	IDs       []string      `json:"ids,omitempty"`
	Streams   []wireStream  `json:"streams,omitempty"`
	Holdings  []wireHolding `json:"holdings,omitempty"`
}

// wireStream is a ROOTCA stream: identity (index into IDs), Envoy node,
// connected since, indexes into Roots of the ACKed and the rejected
// bundle, and the last NACK.
type wireStream struct {
	ID       int    `json:"i"`
	Node     string `json:"n,omitempty"`
	Since    int64  `json:"s"`
	Acked    []int  `json:"a,omitempty"`
	Rejected []int  `json:"r,omitempty"`
	NACK     string `json:"e,omitempty"`
}

// wireHolding is a live certificate: identity and root by index, expiry.
type wireHolding struct {
	ID       int   `json:"i"`
	Root     int   `json:"r"`
	NotAfter int64 `json:"t"`
}

// entry is a replica's entry decoded into what the gate reads.
type entry struct {
	updatedAt time.Time
	streams   []sds.StreamStatus
	holdings  []rotation.Holding
}

// newWire reduces this replica's streams and live certificates to what the
// gate needs: streams subscribed to ROOTCA only, sorted, so that equal
// inputs encode alike.
func newWire(at time.Time, streams []sds.StreamStatus, holdings []rotation.Holding) wire {
	w := wire{Format: format, UpdatedAt: at.UTC()}
	roots, ids := map[string]int{}, map[string]int{}
	intern := func(m map[string]int, list *[]string, s string) int {
		i, ok := m[s]
		if !ok {
			i = len(*list)
			m[s] = i
			*list = append(*list, s)
		}
		return i
	}
	indexes := func(fps []string) []int {
		var out []int
		for _, fp := range fps {
			out = append(out, intern(roots, &w.Roots, fp))
		}
		slices.Sort(out)
		return out
	}
	for _, s := range streams {
		if !slices.Contains(s.Subscribed, sds.RootsName) {
			continue
		}
		w.Streams = append(w.Streams, wireStream{
			ID: intern(ids, &w.IDs, s.Peer.ID.String()), Node: s.Peer.Node, Since: s.Since.Unix(),
			Acked: indexes(s.AckedRoots), Rejected: indexes(s.RejectedRoots), NACK: truncate(s.LastNACK, maxNACK),
		})
	}
	for _, h := range holdings {
		w.Holdings = append(w.Holdings, wireHolding{
			ID: intern(ids, &w.IDs, h.SPIFFEID), Root: intern(roots, &w.Roots, h.RootFingerprint), NotAfter: ceilUnix(h.NotAfter),
		})
	}
	slices.SortFunc(w.Streams, func(a, b wireStream) int {
		return cmp.Or(cmp.Compare(a.ID, b.ID), cmp.Compare(a.Node, b.Node), cmp.Compare(a.Since, b.Since))
	})
	slices.SortFunc(w.Holdings, func(a, b wireHolding) int {
		return cmp.Or(cmp.Compare(a.ID, b.ID), cmp.Compare(a.Root, b.Root), cmp.Compare(a.NotAfter, b.NotAfter))
	})
	return w
}

// ceilUnix is t in Unix seconds, rounded up: a holding must not seem to
// expire before its certificate does.
func ceilUnix(t time.Time) int64 {
	s := t.Unix()
	if t.Nanosecond() > 0 {
		s++
	}
	return s
}

// truncate cuts s to at most n bytes on a rune boundary.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// encode gzips w's JSON.
func (w wire) encode() ([]byte, error) {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if err := json.NewEncoder(zw).Encode(w); err != nil {
		return nil, fmt.Errorf("peers: encoding an entry: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("peers: encoding an entry: %w", err)
	}
	return buf.Bytes(), nil
}

// maxDecoded bounds an entry's JSON, so a corrupt or hostile value cannot
// inflate without limit: 64 times the largest ConfigMap.
const maxDecoded = 64 << 20

// decode reads an entry that encode wrote.
func decode(data []byte) (*entry, error) {
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	lr := &io.LimitedReader{R: zr, N: maxDecoded + 1}
	var w wire
	if err := json.NewDecoder(lr).Decode(&w); err != nil {
		if lr.N <= 0 {
			return nil, fmt.Errorf("over %d bytes once decompressed", maxDecoded)
		}
		return nil, err
	}
	if w.Format != format {
		return nil, fmt.Errorf("format %d, this replica reads format %d", w.Format, format)
	}
	root := func(i int) (string, error) {
		if i < 0 || i >= len(w.Roots) {
			return "", fmt.Errorf("root index %d out of range", i)
		}
		return w.Roots[i], nil
	}
	// Most streams ACKed the same roots: they share one slice, full to
	// capacity so that an append by a reader copies it.
	sets := map[string][]string{}
	roots := func(is []int) ([]string, error) {
		if len(is) == 0 {
			return nil, nil
		}
		key := fmt.Sprint(is)
		if out, ok := sets[key]; ok {
			return out, nil
		}
		out := make([]string, 0, len(is))
		for _, i := range is {
			fp, err := root(i)
			if err != nil {
				return nil, err
			}
			out = append(out, fp)
		}
		sets[key] = out
		return out, nil
	}
	ids := make([]spiffeid.ID, len(w.IDs))
	for i, s := range w.IDs {
		if s == "" {
			continue // an unauthenticated stream
		}
		if ids[i], err = spiffeid.FromString(s); err != nil {
			return nil, err
		}
	}
	id := func(i int) (spiffeid.ID, error) {
		if i < 0 || i >= len(ids) {
			return spiffeid.ID{}, fmt.Errorf("identity index %d out of range", i)
		}
		return ids[i], nil
	}
	e := &entry{updatedAt: w.UpdatedAt, streams: make([]sds.StreamStatus, 0, len(w.Streams)),
		holdings: make([]rotation.Holding, 0, len(w.Holdings))}
	subscribed := []string{sds.RootsName}
	for _, s := range w.Streams {
		st := sds.StreamStatus{Peer: sds.Peer{Node: s.Node}, Since: time.Unix(s.Since, 0).UTC(),
			Subscribed: subscribed, LastNACK: s.NACK}
		if st.Peer.ID, err = id(s.ID); err != nil {
			return nil, err
		}
		if st.AckedRoots, err = roots(s.Acked); err != nil {
			return nil, err
		}
		if st.RejectedRoots, err = roots(s.Rejected); err != nil {
			return nil, err
		}
		e.streams = append(e.streams, st)
	}
	for _, h := range w.Holdings {
		if h.ID < 0 || h.ID >= len(w.IDs) {
			return nil, fmt.Errorf("identity index %d out of range", h.ID)
		}
		fp, err := root(h.Root)
		if err != nil {
			return nil, err
		}
		e.holdings = append(e.holdings, rotation.Holding{SPIFFEID: w.IDs[h.ID], RootFingerprint: fp, NotAfter: time.Unix(h.NotAfter, 0).UTC()})
	}
	return e, nil
}
