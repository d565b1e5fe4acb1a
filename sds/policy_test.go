package sds_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// agentNames is what a node agent subscribes to upstream.
var agentNames = []string{sds.RootsName, sds.PolicyName}

var (
	strict   = policy.Policy{Enabled: true, Mode: policy.ModeStrict}
	excluded = policy.Policy{Enabled: true, Mode: policy.ModeStrict, Excluded: []string{"legacy.shop.svc.cluster.local"}}
)

// withPolicy returns s serving p.
func withPolicy(s sds.Snapshot, p policy.Policy) sds.Snapshot {
	s.Policy = &p
	return s
}

func policyVersion(t *testing.T, p policy.Policy) string {
	t.Helper()
	v, err := sds.PolicyVersion(p)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// holdsPolicy is true once the client holds a policy equal to p.
func holdsPolicy(p policy.Policy) func(sdstest.State) bool {
	return func(s sdstest.State) bool {
		got, ok := s.Policy()
		return ok && got.Equal(p)
	}
}

// TestPolicyIsServedAndPushed: a stream that subscribes to the policy gets
// it as a generic secret holding policy.FormatJSON, at the version
// PolicyVersion names; a change is pushed as a new version and its ACK is
// counted, per protocol.
func TestPolicyIsServedAndPushed(t *testing.T) {
	protocols(t, func(t *testing.T, delta bool) {
		ctx := testCtx(t)
		ag := newAgent(t)
		ag.set(t, withPolicy(ag.snap, strict))
		c := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "agent-1", Names: agentNames, Delta: delta})
		st := wait(t, ctx, c, holdsPolicy(strict))

		sec := st.Secrets[sds.PolicyName].Secret
		want, err := policy.FormatJSON(strict)
		if err != nil {
			t.Fatal(err)
		}
		if got := sec.GetGenericSecret().GetSecret().GetInlineBytes(); string(got) != string(want) {
			t.Errorf("policy secret holds %q, want policy.FormatJSON's %q", got, want)
		}
		v1 := policyVersion(t, strict)
		ackedIs(t, ctx, ag.s, ag.s.PolicyAcked, v1, 1, 1)
		if got := onlyStatus(t, ag.s).Acked[sds.PolicyName]; got != v1 {
			t.Errorf("Status ACKed policy %q, want %q", got, v1)
		}
		if delta {
			if got := versionIn(st.Responses[len(st.Responses)-1], sds.PolicyName); got != v1 {
				t.Errorf("delta resource version %q, want %q", got, v1)
			}
		} else if !strings.Contains(st.Version, sds.PolicyName+"="+v1) {
			t.Errorf("version_info %q does not name policy version %s", st.Version, v1)
		}

		ag.set(t, withPolicy(ag.snap, excluded))
		st = wait(t, ctx, c, holdsPolicy(excluded))
		v2 := policyVersion(t, excluded)
		if v2 == v1 {
			t.Fatal("two policies have one version")
		}
		ackedIs(t, ctx, ag.s, ag.s.PolicyAcked, v2, 1, 1)
		if a, _ := ag.s.PolicyAcked(v1); a != 0 {
			t.Errorf("%d streams still counted on the old policy", a)
		}
		if last := st.Responses[len(st.Responses)-1]; !slices.Equal(last.Names, []string{sds.PolicyName}) {
			t.Errorf("the change went out as %v, want the policy alone", last.Names)
		}

		// The same policy, spelt differently: nothing to send.
		n := len(st.Responses)
		ag.set(t, withPolicy(ag.snap, policy.Policy{Enabled: true, Mode: "strict",
			Excluded: []string{"Legacy.Shop.svc.cluster.local."}}))
		ag.set(t, withRoots(withPolicy(ag.snap, excluded), ag.root, newRoot(t)))
		st = wait(t, ctx, c, func(s sdstest.State) bool { return len(s.Responses) > n })
		if last := st.Responses[len(st.Responses)-1]; !slices.Equal(last.Names, []string{sds.RootsName}) {
			t.Errorf("after an equal policy, the next response carried %v, want only the new ROOTCA", last.Names)
		}

		for _, m := range []struct {
			name string
			want float64
		}{
			{"meshca_sds_pushes_total", 2},
			{"meshca_sds_acks_total", 2},
			{"meshca_sds_nacks_total", 0},
		} {
			if got := metric(t, ag.reg, m.name, "resource", sds.PolicyName); got != m.want {
				t.Errorf("%s{resource=%q} = %v, want %v", m.name, sds.PolicyName, got, m.want)
			}
		}
		if got := metric(t, ag.reg, "meshca_sds_policy_acked_streams", "version", v2); got != 1 {
			t.Errorf("meshca_sds_policy_acked_streams{version=%s} = %v, want 1", v2, got)
		}
		if got := metric(t, ag.reg, "meshca_sds_policy_watching_streams"); got != 1 {
			t.Errorf("meshca_sds_policy_watching_streams = %v, want 1", got)
		}
	})
}

// TestPolicyNACKKeepsTheLastACKed: a rejected policy is recorded with the
// proxy's reason; the stream keeps counting on the one it ACKed, the
// rejected version is not sent again, and the next change is.
func TestPolicyNACKKeepsTheLastACKed(t *testing.T) {
	protocols(t, func(t *testing.T, delta bool) {
		ctx := testCtx(t)
		ag := newAgent(t)
		ag.set(t, withPolicy(ag.snap, strict))
		const reason = "cannot render that policy"
		reject := func(s *tlsv3.Secret) error {
			if strings.Contains(string(s.GetGenericSecret().GetSecret().GetInlineBytes()), "legacy") {
				return errors.New(reason)
			}
			return nil
		}
		c := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "agent-1", Names: agentNames, Delta: delta, Reject: reject})
		wait(t, ctx, c, holdsPolicy(strict))
		v1, bad := policyVersion(t, strict), policyVersion(t, excluded)
		ackedIs(t, ctx, ag.s, ag.s.PolicyAcked, v1, 1, 1)

		ag.set(t, withPolicy(ag.snap, excluded))
		eventually(t, ctx, "the server records the NACK", func() bool { return onlyStatus(t, ag.s).LastNACK != "" })
		ss := onlyStatus(t, ag.s)
		if !strings.Contains(ss.LastNACK, reason) {
			t.Errorf("LastNACK %q, want the proxy's reason", ss.LastNACK)
		}
		if ss.Acked[sds.PolicyName] != v1 || ss.Rejected[sds.PolicyName] != bad {
			t.Errorf("after the NACK: ACKed %q, rejected %q; want %q and %q", ss.Acked[sds.PolicyName], ss.Rejected[sds.PolicyName], v1, bad)
		}
		if ss.RejectedRoots != nil {
			t.Errorf("a rejected policy reads as a rejected bundle: %v", ss.RejectedRoots)
		}
		if a, w := ag.s.PolicyAcked(v1); a != 1 || w != 1 {
			t.Errorf("PolicyAcked(kept) = %d/%d, want 1/1", a, w)
		}
		if a, _ := ag.s.PolicyAcked(bad); a != 0 {
			t.Errorf("PolicyAcked(rejected) = %d, want 0", a)
		}
		if a, n := ag.s.Acked(ca.Fingerprint(ag.root)); a != 1 || n != 1 {
			t.Errorf("the policy NACK moved the bundle's count: Acked = %d/%d, want 1/1", a, n)
		}
		if got := metric(t, ag.reg, "meshca_sds_nacks_total", "resource", sds.PolicyName); got != 1 {
			t.Errorf("nacks{policy} = %v, want 1", got)
		}
		if got := metric(t, ag.reg, "meshca_sds_nacks_total", "resource", sds.RootsName); got != 0 {
			t.Errorf("nacks{ROOTCA} = %v, want 0", got)
		}

		permissive := policy.Policy{Enabled: true, Mode: policy.ModePermissive}
		ag.set(t, withPolicy(ag.snap, permissive))
		wait(t, ctx, c, holdsPolicy(permissive))
		ackedIs(t, ctx, ag.s, ag.s.PolicyAcked, policyVersion(t, permissive), 1, 1)
		if got := metric(t, ag.reg, "meshca_sds_pushes_total", "resource", sds.PolicyName); got != 3 {
			t.Errorf("pushes{policy} = %v, want 3 (the rejected one once)", got)
		}
		if ss := onlyStatus(t, ag.s); ss.Rejected != nil {
			t.Errorf("Rejected %v after a newer policy was ACKed", ss.Rejected)
		}
	})
}

// TestPolicyNeverSharesAResponse: a change of bundle and policy at once
// goes out as two responses, so each is answered on its own, and a policy
// NACK leaves the bundle's ACK standing.
func TestPolicyNeverSharesAResponse(t *testing.T) {
	protocols(t, func(t *testing.T, delta bool) {
		ctx := testCtx(t)
		ag := newAgent(t)
		ag.set(t, withPolicy(ag.snap, strict))
		reject := func(s *tlsv3.Secret) error {
			if s.GetName() == sds.PolicyName && strings.Contains(string(s.GetGenericSecret().GetSecret().GetInlineBytes()), "legacy") {
				return errors.New("no")
			}
			return nil
		}
		h := sdstest.NewHolder()
		c := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "agent-1", Names: agentNames, Delta: delta, Reject: reject, Hold: h.Hold})
		if r := h.Take(t, ctx); !slices.Equal(r.Names, []string{sds.RootsName}) {
			t.Fatalf("first response carried %v, want ROOTCA alone", r.Names)
		}
		h.Answer(t, ctx)
		if r := h.Take(t, ctx); !slices.Equal(r.Names, []string{sds.PolicyName}) {
			t.Fatalf("second response carried %v, want the policy alone", r.Names)
		}
		h.Answer(t, ctx)
		wait(t, ctx, c, holdsPolicy(strict))

		root2 := newRoot(t)
		ag.set(t, withRoots(withPolicy(ag.snap, excluded), ag.root, root2))
		if r := h.Take(t, ctx); !slices.Equal(r.Names, []string{sds.RootsName}) {
			t.Fatalf("response carried %v, want the new ROOTCA alone", r.Names)
		}
		h.Answer(t, ctx)
		// Only the policy can be rejected, and a rejected secret is not
		// listed: nothing else came with it.
		if r := h.Take(t, ctx); len(r.Names) != 0 || r.NACK == "" {
			t.Fatalf("response carried %v (NACK %q), want the policy alone, rejected", r.Names, r.NACK)
		}
		h.Answer(t, ctx)
		ackedIs(t, ctx, ag.s, ag.s.Acked, ca.Fingerprint(root2), 1, 1)
		eventually(t, ctx, "the server records the NACK", func() bool { return onlyStatus(t, ag.s).LastNACK != "" })
		if ss := onlyStatus(t, ag.s); ss.RejectedRoots != nil || ss.Rejected[sds.PolicyName] == "" {
			t.Errorf("rejected: roots %v, resources %v; want only the policy", ss.RejectedRoots, ss.Rejected)
		}
	})
}

// TestPolicyFetch: FetchSecrets answers with the policy too.
func TestPolicyFetch(t *testing.T) {
	ctx := testCtx(t)
	ag := newAgent(t)
	ag.set(t, withPolicy(ag.snap, excluded))
	c := sdstest.New(sdstest.Config{Conn: ag.conn, Node: "agent-1", Names: agentNames})
	if err := c.Fetch(ctx); err != nil {
		t.Fatal(err)
	}
	if p, ok := c.State().Policy(); !ok || !p.Equal(excluded) {
		t.Fatalf("fetched policy %v (held %v), want %v", p, ok, excluded)
	}
}

// noPolicy is a Source without a policy, as casource is when none is
// configured.
type noPolicy struct{ sds.Source }

func (s noPolicy) Watch(ctx context.Context, p sds.Peer, want sds.Want, changed func()) (sds.Watcher, error) {
	if want.Policy {
		return nil, fmt.Errorf("test: %w", sds.ErrNoPolicy)
	}
	return s.Source.Watch(ctx, p, want, changed)
}

// TestNoPolicyIsAnUnknownName: a source without a policy refuses the name
// as unknown, on every RPC, while the secrets are served as before.
func TestNoPolicyIsAnUnknownName(t *testing.T) {
	ag := newAgent(t)
	srv, _ := newServer(t, sds.Config{Source: noPolicy{ag.b}})
	_, conn := serveUnix(t, srv)
	rpc := secretv3.NewSecretDiscoveryServiceClient(conn)
	const want = `unknown resource "meshca-mtls-policy": this server has no mTLS policy to serve`
	for _, mode := range rpcModes {
		t.Run(mode, func(t *testing.T) {
			err := firstAnswer(testCtx(t), rpc, mode, &corev3.Node{Id: "agent-1"}, sds.TypeURL, agentNames)
			if st := status.Convert(err); st.Code() != codes.InvalidArgument || st.Message() != want {
				t.Fatalf("got %v %q, want InvalidArgument %q", st.Code(), st.Message(), want)
			}
		})
	}
	ctx := testCtx(t)
	c := connect(t, ctx, sdstest.Config{Conn: conn, Node: "proxy"})
	wait(t, ctx, c, hasBoth)
}

// TestSnapshotWithoutPolicyServesNone: a policy not there yet is not sent
// (the secrets are); once Set, it follows.
func TestSnapshotWithoutPolicyServesNone(t *testing.T) {
	protocols(t, func(t *testing.T, delta bool) {
		ctx := testCtx(t)
		ag := newAgent(t)
		c := connect(t, ctx, sdstest.Config{Conn: ag.conn, Node: "agent-1", Names: agentNames, Delta: delta})
		st := wait(t, ctx, c, func(s sdstest.State) bool { return s.Has(sds.RootsName) })
		if st.Has(sds.PolicyName) || len(st.Responses) != 1 {
			t.Fatalf("responses %+v before any policy, want one without it", st.Responses)
		}
		ag.set(t, withPolicy(ag.snap, strict))
		wait(t, ctx, c, holdsPolicy(strict))
	})
}

// TestBroadcasterRefusesAnInvalidPolicy: Set validates the policy and
// keeps its own copy.
func TestBroadcasterRefusesAnInvalidPolicy(t *testing.T) {
	b := sds.NewBroadcaster()
	if err := b.Set(sds.Snapshot{Policy: &policy.Policy{Enabled: true, Mode: "SOMETIMES"}}); !errors.Is(err, policy.ErrInvalid) {
		t.Fatalf("Set(invalid policy) = %v, want policy.ErrInvalid", err)
	}
	p := policy.Policy{Enabled: true, Excluded: []string{"a.example.com"}}
	if err := b.Set(sds.Snapshot{Policy: &p}); err != nil {
		t.Fatal(err)
	}
	p.Excluded[0] = "b.example.com"
	if got := b.Snapshot().Policy; got.Excluded[0] != "a.example.com" || got.Mode != policy.ModeStrict {
		t.Fatalf("Broadcaster holds %+v, want its own normalized copy", got)
	}
}
