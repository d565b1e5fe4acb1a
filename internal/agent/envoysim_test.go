package agent_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/meshca/meshca/internal/envoysim"
	"github.com/meshca/meshca/internal/envoysim/envoysimtest"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
	"github.com/meshca/meshca/sds"
)

// TestEnvoySimFollowsTheAgentsPolicy: an Envoy-like proxy runs the
// bootstrap and files the agent writes. Under STRICT a plaintext client is
// refused and an mTLS client served; once the service is excluded, or mTLS
// is off, plaintext gets through; back to STRICT it is refused again. The
// proxy never restarts: the inbound listener keeps its socket throughout.
func TestEnvoySimFollowsTheAgentsPolicy(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	m.setPolicy(t, strictAll)
	cfg := m.envoyConfig(t)
	cfg.Proxy = proxyTemplate(netip.MustParseAddrPort("127.0.0.1:0"), envoysimtest.App(t, "web: "))
	cfg.Proxy.Destinations[0].Listen = netip.MustParseAddrPort("127.0.0.1:0")
	a := m.startReady(t, ctx, cfg)
	m.applied(t, ctx, a, strictAll)
	s := envoysimtest.Start(t, ctx, filepath.Join(cfg.EnvoyConfigDir, envoyconfig.BootstrapFile))
	s.Wait(t, ctx, "the simulator serves with its secrets", func(st envoysim.Status) bool {
		return st.Running && st.Secrets[sds.CertName] != "" && st.Secrets[sds.RootsName] != ""
	})
	addr := s.Sim.Status().Listeners[envoyconfig.InboundListener]
	if addr == "" {
		t.Fatal("no inbound listener")
	}

	// A client of the mesh: a certificate for db from the same CA.
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	issued, err := m.first.SignKey(ctx, key.Public(), dbID, leafTTL)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{PrivateKey: key}
	for _, c := range issued.Chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	mtls := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert},
		InsecureSkipVerify: true} // the server side is under test, not the client's trust

	const msg, served = "hello", "web: hello"
	refusals := "listener." + envoyconfig.InboundListener + ".no_filter_chain_match"
	if got := envoysimtest.Exchange(t, ctx, addr, msg, nil); got != "" || s.Sim.Status().Counters[refusals] != 1 {
		t.Fatalf("STRICT: a plaintext client got %q (%s %d), want the connection refused for want of a chain",
			got, refusals, s.Sim.Status().Counters[refusals])
	}
	if got := envoysimtest.Exchange(t, ctx, addr, msg, mtls); got != served {
		t.Fatalf("STRICT: an mTLS client got %q, want %q", got, served)
	}

	for _, step := range []struct {
		p         policy.Policy
		plaintext bool
	}{
		{webExcluded, true},
		{strictAll, false},
		{mtlsOff, true},
	} {
		m.setPolicy(t, step.p)
		m.applied(t, ctx, a, step.p)
		s.Reload(t, ctx, cfg.EnvoyConfigDir)
		want := ""
		if step.plaintext {
			want = served
		}
		if got := envoysimtest.Exchange(t, ctx, addr, msg, nil); got != want {
			t.Fatalf("under %v: a plaintext client got %q, want %q", step.p, got, want)
		}
		if st := s.Sim.Status(); !st.Running || st.Listeners[envoyconfig.InboundListener] != addr {
			t.Fatalf("under %v: the simulator runs %v, inbound at %s; want it running at %s all along",
				step.p, st.Running, st.Listeners[envoyconfig.InboundListener], addr)
		}
	}
}
