package sds_test

import (
	"context"
	"crypto/x509"
	"slices"
	"testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

func fingerprints(roots ...*x509.Certificate) []string {
	out := make([]string, len(roots))
	for i, r := range roots {
		out[i] = ca.Fingerprint(r)
	}
	return out
}

// TestStatusFollowsEachAnswer: Status says what each stream subscribes to
// and which bundle it rejected, and AckChanged wakes a waiter at each answer
// but not at a push.
func TestStatusFollowsEachAnswer(t *testing.T) {
	protocols(t, func(t *testing.T, delta bool) {
		ctx := testCtx(t)
		ag := newAgent(t)
		bad, good := newRoot(t), newRoot(t)
		h := sdstest.NewHolder()
		c := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "web-1", Delta: delta, Reject: rejectRoot(bad), Hold: h.Hold})
		h.Next(t, ctx)
		wait(t, ctx, c, hasBoth)
		ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(ag.root), 1, 1)
		ss := onlyStatus(t, ag.s)
		if want := []string{sds.CertName, sds.RootsName}; !slices.Equal(ss.Subscribed, want) {
			t.Errorf("Subscribed %v, want %v", ss.Subscribed, want)
		}

		// A push alone changes no accounting; the NACK does.
		changed := ag.s.AckChanged()
		ag.set(t, withRoots(ag.snap, ag.root, bad))
		if r := h.Take(t, ctx); r.NACK == "" {
			t.Fatalf("the client accepted the bad bundle: %+v", r)
		}
		select {
		case <-changed:
			t.Fatal("AckChanged fired before the proxy answered")
		default:
		}
		if ss := onlyStatus(t, ag.s); ss.RejectedRoots != nil {
			t.Errorf("RejectedRoots %v before the proxy answered", ss.RejectedRoots)
		}
		h.Answer(t, ctx)
		fired(t, ctx, changed, "the NACK")
		ss = onlyStatus(t, ag.s)
		if want := fingerprints(ag.root, bad); !slices.Equal(ss.RejectedRoots, want) {
			t.Errorf("RejectedRoots %v after the NACK, want %v", ss.RejectedRoots, want)
		}
		if want := fingerprints(ag.root); !slices.Equal(ss.AckedRoots, want) {
			t.Errorf("AckedRoots %v after the NACK, want %v", ss.AckedRoots, want)
		}

		// The next bundle, in flight, is no longer rejected; once ACKed it
		// is the ACKed one.
		changed = ag.s.AckChanged()
		ag.set(t, withRoots(ag.snap, ag.root, good))
		h.Take(t, ctx)
		if ss := onlyStatus(t, ag.s); ss.RejectedRoots != nil {
			t.Errorf("RejectedRoots %v while another bundle awaits its answer", ss.RejectedRoots)
		}
		h.Answer(t, ctx)
		fired(t, ctx, changed, "the ACK")
		ss = onlyStatus(t, ag.s)
		if want := fingerprints(ag.root, good); ss.RejectedRoots != nil || !slices.Equal(ss.AckedRoots, want) {
			t.Errorf("after the ACK: RejectedRoots %v, AckedRoots %v, want none and %v", ss.RejectedRoots, ss.AckedRoots, want)
		}

		// Unsubscribing and leaving wake waiters too.
		changed = ag.s.AckChanged()
		if err := c.Unsubscribe(sds.RootsName); err != nil {
			t.Fatal(err)
		}
		fired(t, ctx, changed, "the unsubscription")
		if ss := onlyStatus(t, ag.s); !slices.Equal(ss.Subscribed, []string{sds.CertName}) {
			t.Errorf("Subscribed %v after unsubscribing from ROOTCA", ss.Subscribed)
		}
		changed = ag.s.AckChanged()
		c.Disconnect()
		fired(t, ctx, changed, "the end of the stream")
		if a, n := ag.s.Acked(ca.Fingerprint(ag.root)); a != 0 || n != 0 {
			t.Errorf("Acked = %d/%d after the stream ended, want 0/0", a, n)
		}
	})
}

func fired(t *testing.T, ctx context.Context, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-ctx.Done():
		t.Fatalf("AckChanged did not fire at %s", what)
	}
}
