package peers

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/sds"
)

// fleet makes n ROOTCA streams as a cluster would have them: ten pods per
// service account, node IDs from pod names with random suffixes, every
// stream ACKing both roots, two live certificates per proxy (one renewed,
// one about to expire).
func fleet(n int, at time.Time) ([]sds.StreamStatus, []rotation.Holding) {
	rnd := rand.New(rand.NewPCG(1, 2))
	const alnum = "bcdfghjklmnpqrstvwxz2456789"
	suffix := func(k int) string {
		b := make([]byte, k)
		for i := range b {
			b[i] = alnum[rnd.IntN(len(alnum))]
		}
		return string(b)
	}
	a, b := fmt.Sprintf("%064x", 0xa), fmt.Sprintf("%064x", 0xb)
	var streams []sds.StreamStatus
	var holdings []rotation.Holding
	for i := range n {
		ns, sa := fmt.Sprintf("team-%03d", i/50), fmt.Sprintf("service-%d", i/10%5)
		id := spiffeid.RequireFromString("spiffe://cluster.local/ns/" + ns + "/sa/" + sa)
		streams = append(streams, sds.StreamStatus{
			Peer:  sds.Peer{ID: id, Node: "meshca-agent/" + sa + "-" + suffix(10) + "-" + suffix(5)},
			Since: at.Add(-time.Duration(rnd.Int64N(int64(24 * time.Hour)))), Subscribed: []string{sds.RootsName, sds.CertName},
			AckedRoots: []string{a, b},
		})
		renewed := at.Add(time.Duration(rnd.Int64N(int64(30 * time.Minute)))).Add(30 * time.Minute).Truncate(time.Second)
		holdings = append(holdings,
			rotation.Holding{SPIFFEID: id.String(), RootFingerprint: a, NotAfter: renewed},
			rotation.Holding{SPIFFEID: id.String(), RootFingerprint: a, NotAfter: renewed.Add(-30 * time.Minute)})
	}
	return streams, holdings
}

// BenchmarkPublish10k measures what one publication of 10,000 proxies
// costs this replica: reducing the streams and holdings, JSON, gzip. It
// reports the stored size per proxy.
func BenchmarkPublish10k(b *testing.B) {
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	streams, holdings := fleet(10000, at)
	var size int
	b.ReportAllocs()
	for b.Loop() {
		data, err := newWire(at, streams, holdings).encode()
		if err != nil {
			b.Fatal(err)
		}
		size = len(data)
	}
	b.ReportMetric(float64(size), "bytes")
	b.ReportMetric(float64(size)/10000, "bytes/proxy")
}

// BenchmarkDecode10k measures what reading another replica's entry of
// 10,000 proxies costs: gunzip, JSON, SPIFFE IDs parsed once each. Every
// replica pays it per other replica and Interval, as each rewrite changes
// the entry's time.
func BenchmarkDecode10k(b *testing.B) {
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	streams, holdings := fleet(10000, at)
	data, err := newWire(at, streams, holdings).encode()
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		e, err := decode(data)
		if err != nil {
			b.Fatal(err)
		}
		if len(e.streams) != 10000 || len(e.holdings) != 20000 {
			b.Fatalf("%d streams, %d holdings", len(e.streams), len(e.holdings))
		}
	}
}
