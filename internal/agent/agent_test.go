package agent_test

import (
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/agent"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

var (
	webID = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/web")
	apiID = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/api")
	dbID  = spiffeid.RequireFromString("spiffe://cluster.local/ns/prod/sa/db")
)

func TestRenewsAtTheJitteredTime(t *testing.T) {
	// RenewAt 0.5 and Jitter 0.1 by default: Rand 0 renews at 0.4 of the
	// lifetime, Rand 1 at 0.6.
	for _, tc := range []struct {
		name     string
		rand     float64
		num, den time.Duration
	}{
		{"earliest", 0, 2, 5},
		{"latest", 1, 3, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t)
			m := newMesh(t)
			cfg := m.config(t, "default", "web")
			cfg.TTL = 23 * time.Hour // at least clockLag, to be valid in real time
			cfg.Rand = func() float64 { return tc.rand }
			a := m.startReady(t, ctx, cfg)
			proxy := envoy(t, ctx, a, "web", false)
			first := leafOf(t, wait(t, ctx, proxy, holdsSerial(t, a.Status().Serial)))

			life := first.NotAfter.Sub(first.NotBefore)
			if want := cfg.TTL + ca.Backdate; life != want {
				t.Fatalf("certificate lifetime %s, want the requested %s plus the CA's backdating", life, want)
			}
			// The lifetime counts from issuance, not from the backdated
			// NotBefore; the fake clock has not moved since.
			issued := first.NotBefore.Add(ca.Backdate)
			want := issued.Add(first.NotAfter.Sub(issued) * tc.num / tc.den)
			if got := a.Status().NextRenewal; !got.Equal(want) {
				t.Fatalf("renewal planned at %s, want %s", got, want)
			}

			blockUntil(t, ctx, m.clock, 1)
			advanceTo(t, m.clock, want.Add(-time.Millisecond))
			// A timer that fired is re-armed only after the request it
			// triggered, so this returns after any early renewal.
			blockUntil(t, ctx, m.clock, 1)
			if n := fetchCount(m); n != 1 {
				t.Fatalf("%d requests a millisecond before the renewal time, want 1", n)
			}

			advanceTo(t, m.clock, want)
			second := leafOf(t, wait(t, ctx, proxy, func(s sdstest.State) bool {
				l := leafOf(t, s)
				return l != nil && !l.Equal(first)
			}))
			blockUntil(t, ctx, m.clock, 1)
			calls := m.fetches.seen()
			if len(calls) != 2 || !calls[1].At.Equal(want) {
				t.Fatalf("requests at %v, want the second exactly at %s", times(calls), want)
			}
			if got, next := a.Status().NextRenewal, want.Add(second.NotAfter.Sub(want)*tc.num/tc.den); !got.Equal(next) {
				t.Errorf("next renewal at %s, want %s", got, next)
			}
			if got := metric(t, a.reg, "meshca_agent_renewals_total", "result", "success"); got != 2 {
				t.Errorf("renewals_total{success} = %v, want 2", got)
			}
			if got := metric(t, a.reg, "meshca_agent_certificate_expiry_timestamp_seconds"); got != float64(second.NotAfter.Unix()) {
				t.Errorf("expiry gauge %v, want %d", got, second.NotAfter.Unix())
			}
		})
	}
}

func times(calls []authCall) []time.Time {
	var out []time.Time
	for _, c := range calls {
		out = append(out, c.At)
	}
	return out
}

func TestKeepsServingThroughAnOutage(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	cfg := m.config(t, "default", "web")
	cfg.Rand = func() float64 { return 0 } // no jitter off the retry delays
	a := m.startReady(t, ctx, cfg)
	proxies := []*sdstest.Client{envoy(t, ctx, a, "sotw", false), envoy(t, ctx, a, "delta", true)}
	old := a.Status()
	for _, p := range proxies {
		wait(t, ctx, p, holdsSerial(t, old.Serial))
	}

	m.net.setDown(true)
	// Both loops now wait on the clock: renewal, and the ROOTCA stream's
	// reconnection.
	blockUntil(t, ctx, m.clock, 2)
	advanceTo(t, m.clock, old.NextRenewal)
	wantGaps := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 30 * time.Second}
	var gaps []time.Duration
	prev := old.NextRenewal
	for i := range wantGaps {
		var st agent.Status
		eventually(t, ctx, "the attempt failed", func() error {
			if st = a.Status(); !st.NextRenewal.After(prev) {
				return errors.New("no new attempt planned")
			}
			return nil
		})
		if st.LastError == nil || st.Serial != old.Serial {
			t.Fatalf("after a failed renewal: last error %v, serial %s (want the old %s)", st.LastError, st.Serial, old.Serial)
		}
		if err := a.Ready(); err != nil {
			t.Fatalf("not ready with a valid certificate: %v", err)
		}
		gaps = append(gaps, st.NextRenewal.Sub(prev))
		prev = st.NextRenewal
		blockUntil(t, ctx, m.clock, 2)
		if i < len(wantGaps)-1 {
			advanceTo(t, m.clock, prev)
		}
	}
	if !slices.Equal(gaps, wantGaps) {
		t.Fatalf("retries %v apart, want %v", gaps, wantGaps)
	}
	for _, p := range proxies {
		if s := p.State(); !holdsSerial(t, old.Serial)(s) || !s.Connected {
			t.Fatalf("proxy lost its certificate during the outage (connected %v)", s.Connected)
		}
	}

	m.net.setDown(false)
	advanceTo(t, m.clock, prev)
	eventually(t, ctx, "renewal succeeded", func() error {
		if st := a.Status(); st.Serial == old.Serial || st.LastError != nil {
			return fmt.Errorf("serial %s, last error %v", st.Serial, st.LastError)
		}
		return nil
	})
	renewed := a.Status()
	for _, p := range proxies {
		wait(t, ctx, p, holdsSerial(t, renewed.Serial))
	}
	if got := metric(t, a.reg, "meshca_agent_renewals_total", "result", "failure"); got != float64(len(wantGaps)) {
		t.Errorf("renewals_total{failure} = %v, want %d", got, len(wantGaps))
	}
	if got := metric(t, a.reg, "meshca_agent_renewals_total", "result", "success"); got != 2 {
		t.Errorf("renewals_total{success} = %v, want 2", got)
	}

	// The ROOTCA stream is back within its longest backoff.
	before := m.clock.Now()
	advanceTo(t, m.clock, before.Add(agent.DefaultRetryMax))
	m.waitStream(t, ctx, webID, before)
}

func TestReadsTheTokenForEveryRequest(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	cfg := m.config(t, "default", "web")
	webToken := m.mint(t, "default", "web")
	writeToken(t, cfg.TokenFile, webToken)
	a := m.startReady(t, ctx, cfg)
	proxy := envoy(t, ctx, a, "web", false)
	first := a.Status()
	wait(t, ctx, proxy, holdsSerial(t, first.Serial))
	if first.ID != webID {
		t.Fatalf("first certificate for %s, want %s", first.ID, webID)
	}

	// The kubelet replaces the token; a token of another service account
	// makes it visible which one the server was shown.
	apiToken := m.mint(t, "default", "api")
	writeToken(t, cfg.TokenFile, apiToken)
	blockUntil(t, ctx, m.clock, 1)
	advanceTo(t, m.clock, first.NextRenewal)
	eventually(t, ctx, "the certificate was renewed", func() error {
		if st := a.Status(); st.ID != apiID {
			return fmt.Errorf("certificate for %s", st.ID)
		}
		return nil
	})
	wait(t, ctx, proxy, holdsSerial(t, a.Status().Serial))
	svid, err := proxy.SVID()
	if err != nil {
		t.Fatal(err)
	}
	if svid.ID != apiID {
		t.Errorf("proxy holds a certificate for %s, want %s", svid.ID, apiID)
	}

	calls := m.fetches.seen()
	if len(calls) != 2 || calls[0].Token != webToken || calls[1].Token != apiToken {
		t.Fatalf("server saw %d requests, want the first with the old token and the second with the new", len(calls))
	}
	// The ROOTCA stream presents the token and the cluster too.
	streams := m.streams.seen()
	if len(streams) == 0 || streams[0].Token != webToken || streams[0].ID != webID {
		t.Fatalf("stream opened without the workload's token: %+v", streams)
	}
	for _, c := range append(calls, streams...) {
		if c.ClusterID != clusterID {
			t.Errorf("request named cluster %q, want %q", c.ClusterID, clusterID)
		}
	}
}

func TestNewRootReachesEveryProxyAtOnce(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	a := m.startReady(t, ctx, m.config(t, "default", "web"))
	r1 := m.first.Issuer().Roots[0]
	proxies := []*sdstest.Client{
		envoy(t, ctx, a, "sotw-1", false),
		envoy(t, ctx, a, "sotw-2", false),
		envoy(t, ctx, a, "delta", true),
	}
	for _, p := range proxies {
		wait(t, ctx, p, func(s sdstest.State) bool { return s.Has(sds.CertName) && holdsRoot(r1)(s) })
	}

	// The clock does not move: this is not renewal.
	r2 := newRoot(t)
	m.setBundle(t, r1, r2)
	for _, p := range proxies {
		wait(t, ctx, p, func(s sdstest.State) bool { return holdsRoot(r1)(s) && holdsRoot(r2)(s) })
	}
	// The agent ACKed it upstream, as Envoy would.
	eventually(t, ctx, "the server counts the agent's ACK", func() error {
		if acked, connected := m.central.Acked(ca.Fingerprint(r2)); acked != 1 || connected != 1 {
			return fmt.Errorf("%d of %d streams ACKed", acked, connected)
		}
		return nil
	})
	if got, want := a.Status().Roots, []string{ca.Fingerprint(r1), ca.Fingerprint(r2)}; !slices.Equal(got, want) {
		t.Errorf("status roots %v, want %v", got, want)
	}
	if got := metric(t, a.reg, "meshca_agent_bundle_updates_total"); got != 1 {
		t.Errorf("bundle_updates_total = %v, want 1", got)
	}
	// The certificate still chains to a trusted root: no renewal.
	if n := fetchCount(m); n != 1 {
		t.Errorf("%d certificate requests, want 1", n)
	}
}

func TestRejectsABundleOfNonCACertificates(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	a := m.startReady(t, ctx, m.config(t, "default", "web"))
	proxy := envoy(t, ctx, a, "web", false)
	before := a.Status().Roots
	leaf := leafOf(t, wait(t, ctx, proxy, holdsSerial(t, a.Status().Serial)))

	m.setBundle(t, leaf)
	eventually(t, ctx, "the agent NACKed the bundle", func() error {
		for _, s := range m.central.Status() {
			if s.LastNACK != "" {
				return nil
			}
		}
		return errors.New("no NACK")
	})
	if got := a.Status().Roots; !slices.Equal(got, before) {
		t.Errorf("roots changed to %v after a bad bundle", got)
	}
	if holdsRoot(leaf)(proxy.State()) {
		t.Error("the proxy was handed a leaf as a trust anchor")
	}
}

func TestFollowsARootRotation(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	a := m.startReady(t, ctx, m.config(t, "default", "web"))
	proxy := envoy(t, ctx, a, "web", false)
	r1 := m.first.Issuer().Roots[0]
	wait(t, ctx, proxy, holdsSerial(t, a.Status().Serial))

	second := newAuthority(t, m.clock)
	r2 := second.Issuer().Roots[0]
	// Step 1: the new root is added. The certificate still chains to r1.
	m.setBundle(t, r1, r2)
	wait(t, ctx, proxy, holdsRoot(r2))
	if n := fetchCount(m); n != 1 {
		t.Fatalf("%d certificate requests after adding a root, want 1", n)
	}

	// Step 2: the server signs, and serves TLS, under r2 only, and r1 is
	// retired. The clock does not move: the agent renews because its
	// certificate no longer chains to the bundle, over a connection it
	// authenticates with r2 alone, and verifies the new chain against r2.
	m.ca.use(second)
	m.setBundle(t, r2)
	st := wait(t, ctx, proxy, func(s sdstest.State) bool {
		l := leafOf(t, s)
		return l != nil && l.CheckSignatureFrom(second.Issuer().Cert) == nil && !holdsRoot(r1)(s)
	})
	svid, err := proxy.SVID()
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(r2)
	inter := x509.NewCertPool()
	for _, c := range svid.Certificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leafOf(t, st).Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("renewed certificate does not chain to the new root: %v", err)
	}
	if got, want := a.Status().Roots, []string{ca.Fingerprint(r2)}; !slices.Equal(got, want) {
		t.Errorf("status roots %v, want %v", got, want)
	}

	// The ROOTCA stream reconnects, authenticating the server with r2.
	m.net.setDown(true)
	blockUntil(t, ctx, m.clock, 2)
	m.net.setDown(false)
	before := m.clock.Now()
	advanceTo(t, m.clock, before.Add(agent.DefaultRetryMax))
	m.waitStream(t, ctx, webID, before)
}

func TestWithdrawsAnExpiredCertificate(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	cfg := m.config(t, "default", "web")
	// The certificate ends half a minute after the real now, so the one
	// issued after the outage, at the fake clock's time by then, is valid in
	// real time as well.
	cfg.TTL = clockLag + 30*time.Second
	cfg.RetryMax = 4 * time.Second
	cfg.Rand = func() float64 { return 0 }
	a := m.startReady(t, ctx, cfg)
	delta := envoy(t, ctx, a, "delta", true)
	first := a.Status()
	wait(t, ctx, delta, holdsSerial(t, first.Serial))

	m.net.setDown(true)
	blockUntil(t, ctx, m.clock, 2)
	advanceTo(t, m.clock, first.NotAfter.Add(-time.Second))
	eventually(t, ctx, "renewal failed", func() error { return nilIf(a.Status().LastError != nil) })
	if err := a.Ready(); err != nil {
		t.Fatalf("not ready a second before expiry: %v", err)
	}
	if !holdsSerial(t, first.Serial)(delta.State()) {
		t.Fatal("certificate withdrawn before it expired")
	}

	blockUntil(t, ctx, m.clock, 2)
	advanceTo(t, m.clock, first.NotAfter)
	wait(t, ctx, delta, func(s sdstest.State) bool { return !s.Has(sds.CertName) && s.Has(sds.RootsName) })
	if err := a.Ready(); !errors.Is(err, agent.ErrNoCertificate) {
		t.Fatalf("Ready() = %v after expiry, want ErrNoCertificate", err)
	}
	if st := a.Status(); !st.Withdrawn || st.Serial != first.Serial {
		t.Fatalf("status after expiry: withdrawn %v, serial %s", st.Withdrawn, st.Serial)
	}
	// A proxy that connects now is not handed the expired certificate.
	late := envoy(t, ctx, a, "late", false)
	if s := wait(t, ctx, late, func(s sdstest.State) bool { return s.Has(sds.RootsName) }); s.Has(sds.CertName) {
		t.Fatal("a new proxy was handed the expired certificate")
	}

	// Recovery needs nothing but the server.
	m.net.setDown(false)
	blockUntil(t, ctx, m.clock, 2)
	advanceTo(t, m.clock, a.Status().NextRenewal)
	eventually(t, ctx, "the agent is ready again", a.Ready)
	renewed := a.Status()
	if renewed.Withdrawn || renewed.Serial == first.Serial {
		t.Fatalf("after recovery: withdrawn %v, serial %s", renewed.Withdrawn, renewed.Serial)
	}
	wait(t, ctx, delta, holdsSerial(t, renewed.Serial))
	wait(t, ctx, late, holdsSerial(t, renewed.Serial))
}

func nilIf(ok bool) error {
	if ok {
		return nil
	}
	return errors.New("not yet")
}
