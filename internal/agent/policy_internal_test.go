package agent

import (
	"crypto/x509"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/catest"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
	"github.com/meshca/meshca/sds"
)

// response packs secrets as the server's state-of-the-world stream does.
func response(t *testing.T, secrets ...*tlsv3.Secret) *discoveryv3.DiscoveryResponse {
	t.Helper()
	resp := &discoveryv3.DiscoveryResponse{TypeUrl: sds.TypeURL, VersionInfo: "v", Nonce: "1"}
	for _, s := range secrets {
		a, err := anypb.New(s)
		if err != nil {
			t.Fatal(err)
		}
		resp.Resources = append(resp.Resources, a)
	}
	return resp
}

func policySecret(b []byte) *tlsv3.Secret {
	return &tlsv3.Secret{Name: sds.PolicyName, Type: &tlsv3.Secret_GenericSecret{GenericSecret: &tlsv3.GenericSecret{
		Secret: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b}}}}}
}

func rootsSecret(roots ...*x509.Certificate) *tlsv3.Secret {
	return &tlsv3.Secret{Name: sds.RootsName, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: ca.EncodeCerts(roots...)}}}}}
}

// TestMalformedPolicyIsRejected: what the real server cannot send (it
// validates every policy), a newer or broken one might: a policy that
// does not parse is rejected with the reason, with anything that came
// with it, and the configuration in force stays.
func TestMalformedPolicyIsRejected(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	root := catest.NewRoot(t, ca.Validity{NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)})
	reg := prometheus.NewRegistry()
	a, err := New(Config{ServerAddr: "127.0.0.1:1", TrustBundle: []*x509.Certificate{root}, TokenFile: filepath.Join(dir, "token"),
		SocketPath: filepath.Join(dir, "sds", "agent.sock"), EnvoyConfigDir: filepath.Join(dir, "envoy"), Metrics: reg,
		Proxy: envoyconfig.Proxy{Service: envoyconfig.Service{FQDN: "web.shop.svc.cluster.local",
			Listen: netip.MustParseAddrPort("127.0.0.1:15006"), App: netip.MustParseAddrPort("127.0.0.1:8080")}}})
	if err != nil {
		t.Fatal(err)
	}
	good, err := policy.FormatJSON(policy.Policy{Enabled: true})
	if err != nil {
		t.Fatal(err)
	}
	if reject, retry := a.handleResponse(t.Context(), response(t, policySecret(good))); reject != nil || retry != nil {
		t.Fatalf("a good policy: reject %v, retry %v", reject, retry)
	}
	lds := filepath.Join(dir, "envoy", envoyconfig.LDSFile)
	before, err := os.ReadFile(lds)
	if err != nil {
		t.Fatal(err)
	}
	goodVersion := a.Status().PolicyVersion

	other := catest.NewRoot(t, ca.Validity{NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)})
	for _, tc := range []struct {
		name string
		resp *discoveryv3.DiscoveryResponse
		want string
	}{
		{"unknown mode", response(t, rootsSecret(root, other), policySecret([]byte(`{"enabled": true, "mode": "AUDIT"}`))), `mode "AUDIT"`},
		{"unknown field", response(t, policySecret([]byte(`{"enabled": true, "exclude": ["a.example.com"]}`))), "unknown field"},
		{"not JSON", response(t, policySecret([]byte("enabled"))), "invalid"},
		{"not a generic secret", response(t, &tlsv3.Secret{Name: sds.PolicyName}), "not a generic secret"},
		{"nothing asked for", response(t, &tlsv3.Secret{Name: "default"}), "without"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reject, retry := a.handleResponse(t.Context(), proto.Clone(tc.resp).(*discoveryv3.DiscoveryResponse))
			if reject == nil || !strings.Contains(reject.Error(), tc.want) || retry != nil {
				t.Fatalf("reject %v, retry %v; want a rejection naming %q, no retry", reject, retry, tc.want)
			}
			if after, err := os.ReadFile(lds); err != nil || string(after) != string(before) {
				t.Errorf("LDS changed (err %v)", err)
			}
			if st := a.Status(); st.PolicyVersion != goodVersion || len(st.Roots) != 1 {
				t.Errorf("Status: policy %s, %d roots; want the good policy and the first root alone", st.PolicyVersion, len(st.Roots))
			}
		})
	}
	if st := a.Status(); st.PolicyError == nil {
		t.Error("Status has no policy error after the rejections")
	}
	var parse dto.Metric
	if err := a.metrics.policyFailures.WithLabelValues("parse").Write(&parse); err != nil {
		t.Fatal(err)
	}
	if v := parse.GetCounter().GetValue(); v != 4 {
		t.Errorf("parse failures = %v, want 4", v)
	}
}
