package agent_test

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

func fps(roots ...*x509.Certificate) []string {
	out := make([]string, len(roots))
	for i, r := range roots {
		out[i] = ca.Fingerprint(r)
	}
	return out
}

// upstreamAcked waits until the server counts the agent's stream as having
// ACKed root, out of one stream.
func (m *mesh) upstreamAcked(t *testing.T, ctx context.Context, root *x509.Certificate) {
	t.Helper()
	eventually(t, ctx, "the server counts the agent's ACK", func() error {
		if acked, connected := m.central.Acked(ca.Fingerprint(root)); acked != 1 || connected != 1 {
			return fmt.Errorf("%d of %d streams ACKed", acked, connected)
		}
		return nil
	})
}

// TestUpstreamACKWaitsForEveryProxy: the server hears that the agent has a
// new bundle only once every local proxy has ACKed it, whichever protocol
// it speaks.
func TestUpstreamACKWaitsForEveryProxy(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	a := m.startReady(t, ctx, m.config(t, "default", "web"))
	r1 := m.first.Issuer().Roots[0]
	quick := envoy(t, ctx, a, "quick", false)
	h := sdstest.NewHolder()
	slow := envoyWith(t, ctx, a, sdstest.Config{Node: "slow", Delta: true, Hold: h.Hold})
	h.Take(t, ctx)
	h.Answer(t, ctx)
	for _, p := range []*sdstest.Client{quick, slow} {
		wait(t, ctx, p, func(s sdstest.State) bool { return s.Has(sds.CertName) && holdsRoot(r1)(s) })
	}

	r2 := newRoot(t)
	m.setBundle(t, r1, r2)
	if r := h.Take(t, ctx); !slices.Contains(r.Names, sds.RootsName) {
		t.Fatalf("the slow proxy was sent %v, want the new ROOTCA", r.Names)
	}
	wait(t, ctx, quick, holdsRoot(r2))
	eventually(t, ctx, "the agent holds back its ACK", func() error {
		if got := a.Status().PendingBundle; !slices.Equal(got, fps(r1, r2)) {
			return fmt.Errorf("pending bundle %v", got)
		}
		return nil
	})
	// The agent answers the server only after the slow proxy answers, and
	// that answer is held.
	if acked, connected := m.central.Acked(ca.Fingerprint(r2)); acked != 0 || connected != 1 {
		t.Fatalf("server counts %d of %d streams as ACKing the new root while a proxy has not", acked, connected)
	}

	h.Answer(t, ctx)
	m.upstreamAcked(t, ctx, r2)
	if got := a.Status().PendingBundle; got != nil {
		t.Errorf("pending bundle %v after the ACK", got)
	}
	for _, s := range m.central.Status() {
		if s.LastNACK != "" {
			t.Errorf("the agent NACKed upstream: %s", s.LastNACK)
		}
	}
}

// TestUpstreamNACKWhenAProxyRejects: a bundle a local proxy rejects is
// rejected upstream, with the proxy's reason; the next one is ACKed.
func TestUpstreamNACKWhenAProxyRejects(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	a := m.startReady(t, ctx, m.config(t, "default", "web"))
	r1, bad, good := m.first.Issuer().Roots[0], newRoot(t), newRoot(t)
	const reason = "this proxy does not trust that root"
	picky := envoyWith(t, ctx, a, sdstest.Config{Node: "picky", Reject: rejectRoot(bad, reason)})
	happy := envoy(t, ctx, a, "happy", true)
	for _, p := range []*sdstest.Client{picky, happy} {
		wait(t, ctx, p, func(s sdstest.State) bool { return s.Has(sds.CertName) && holdsRoot(r1)(s) })
	}

	m.setBundle(t, r1, bad)
	var nack string
	eventually(t, ctx, "the agent NACKed upstream", func() error {
		for _, s := range m.central.Status() {
			if nack = s.LastNACK; nack != "" {
				return nil
			}
		}
		return errors.New("no NACK")
	})
	if !strings.Contains(nack, reason) || !strings.Contains(nack, `"picky"`) {
		t.Errorf("upstream NACK %q does not name the proxy and its reason", nack)
	}
	if acked, connected := m.central.Acked(ca.Fingerprint(bad)); acked != 0 || connected != 1 {
		t.Errorf("server counts %d of %d streams as ACKing the rejected root", acked, connected)
	}
	wait(t, ctx, happy, holdsRoot(bad))

	m.setBundle(t, r1, good)
	m.upstreamAcked(t, ctx, good)
	wait(t, ctx, picky, holdsRoot(good))
}

// TestUpstreamACKAtOnceWithoutROOTCAWatchers: a proxy that takes only its
// certificate has nothing to ACK; the bundle is ACKed upstream at once.
// (With no proxy at all, startReady already waits for that ACK.)
func TestUpstreamACKAtOnceWithoutROOTCAWatchers(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	a := m.startReady(t, ctx, m.config(t, "default", "web"))
	r1 := m.first.Issuer().Roots[0]
	certOnly := envoyWith(t, ctx, a, sdstest.Config{Node: "cert-only", Names: []string{sds.CertName}})
	wait(t, ctx, certOnly, func(s sdstest.State) bool { return s.Has(sds.CertName) })

	r2 := newRoot(t)
	m.setBundle(t, r1, r2)
	m.upstreamAcked(t, ctx, r2)
	if got := a.Status().Roots; !slices.Equal(got, fps(r1, r2)) {
		t.Errorf("agent roots %v, want %v", got, fps(r1, r2))
	}
}

// rejectRoot makes a client NACK every bundle holding root.
func rejectRoot(root *x509.Certificate, reason string) func(*tlsv3.Secret) error {
	pemRoot := string(ca.EncodeCerts(root))
	return func(s *tlsv3.Secret) error {
		if strings.Contains(string(s.GetValidationContext().GetTrustedCa().GetInlineBytes()), pemRoot) {
			return errors.New(reason)
		}
		return nil
	}
}
