package identity_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/meshca/meshca/identity"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func TestWorkloadID(t *testing.T) {
	tests := []struct {
		name    string
		ns, sa  string
		want    string
		wantErr bool
	}{
		{name: "valid", ns: "default", sa: "web", want: "spiffe://example.org/ns/default/sa/web"},
		{name: "digits and dashes", ns: "team-1", sa: "api-v2", want: "spiffe://example.org/ns/team-1/sa/api-v2"},
		{name: "dots in service account", ns: "default", sa: "web.frontend", want: "spiffe://example.org/ns/default/sa/web.frontend"},
		{name: "max length namespace", ns: strings.Repeat("a", 63), sa: "web", want: "spiffe://example.org/ns/" + strings.Repeat("a", 63) + "/sa/web"},
		{name: "single character", ns: "a", sa: "b", want: "spiffe://example.org/ns/a/sa/b"},
		{name: "uppercase namespace", ns: "Default", sa: "web", wantErr: true},
		{name: "uppercase service account", ns: "default", sa: "Web", wantErr: true},
		{name: "dots in namespace", ns: "kube.system", sa: "web", wantErr: true},
		{name: "leading dash namespace", ns: "-default", sa: "web", wantErr: true},
		{name: "trailing dash namespace", ns: "default-", sa: "web", wantErr: true},
		{name: "leading dash service account", ns: "default", sa: "-web", wantErr: true},
		{name: "trailing dash service account", ns: "default", sa: "web-", wantErr: true},
		{name: "leading dot service account", ns: "default", sa: ".web", wantErr: true},
		{name: "trailing dot service account", ns: "default", sa: "web.", wantErr: true},
		{name: "double dot service account", ns: "default", sa: "web..api", wantErr: true},
		{name: "dash next to dot service account", ns: "default", sa: "web-.api", wantErr: true},
		{name: "namespace too long", ns: strings.Repeat("a", 64), sa: "web", wantErr: true},
		{name: "service account too long", ns: "default", sa: strings.Repeat("a", 254), wantErr: true},
		{name: "empty namespace", ns: "", sa: "web", wantErr: true},
		{name: "empty service account", ns: "default", sa: "", wantErr: true},
		{name: "slash", ns: "default", sa: "web/../admin", wantErr: true},
		{name: "colon", ns: "default", sa: "web:admin", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := identity.WorkloadID(td, tt.ns, tt.sa)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("WorkloadID(%q, %q) = %v, want error", tt.ns, tt.sa, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("WorkloadID(%q, %q): %v", tt.ns, tt.sa, err)
			}
			if got.String() != tt.want {
				t.Errorf("WorkloadID(%q, %q) = %s, want %s", tt.ns, tt.sa, got, tt.want)
			}
		})
	}
}

func TestWorkloadIDZeroTrustDomain(t *testing.T) {
	if id, err := identity.WorkloadID(spiffeid.TrustDomain{}, "default", "web"); err == nil {
		t.Fatalf("WorkloadID with zero trust domain = %v, want error", id)
	}
}

func TestHashToken(t *testing.T) {
	tests := []struct {
		name  string
		token string
	}{
		{name: "jwt-like", token: "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"},
		{name: "short", token: "abc"},
		{name: "empty", token: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := identity.HashToken(tt.token)
			if h2 := identity.HashToken(tt.token); h != h2 {
				t.Errorf("HashToken not stable: %q then %q", h, h2)
			}
			if len(h) != 32 {
				t.Errorf("HashToken length = %d, want 32", len(h))
			}
			if tt.token != "" && strings.Contains(h, tt.token) {
				t.Errorf("HashToken(%q) = %q contains the token", tt.token, h)
			}
			if h == identity.HashToken(tt.token+"x") {
				t.Errorf("HashToken collides for %q and %q", tt.token, tt.token+"x")
			}
		})
	}
}

func TestReasonOf(t *testing.T) {
	denied := identity.Deny(identity.ReasonExpired, "token expired at %s", "noon")
	tests := []struct {
		name string
		err  error
		want identity.Reason
	}{
		{name: "nil", err: nil, want: ""},
		{name: "plain error", err: errors.New("boom"), want: ""},
		{name: "deny", err: denied, want: identity.ReasonExpired},
		{name: "wrapped deny", err: fmt.Errorf("ca: %w", denied), want: identity.ReasonExpired},
		{name: "error literal", err: &identity.Error{Reason: identity.ReasonMissing}, want: identity.ReasonMissing},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := identity.ReasonOf(tt.err); got != tt.want {
				t.Errorf("ReasonOf(%v) = %q, want %q", tt.err, got, tt.want)
			}
		})
	}
}

func TestDeny(t *testing.T) {
	cause := errors.New("signature mismatch")
	err := identity.Deny(identity.ReasonInvalid, "verifying token: %w", cause)

	var e *identity.Error
	if !errors.As(err, &e) {
		t.Fatalf("Deny returned %T, want *identity.Error", err)
	}
	if e.Reason != identity.ReasonInvalid {
		t.Errorf("Reason = %q, want %q", e.Reason, identity.ReasonInvalid)
	}
	if !errors.Is(err, cause) {
		t.Error("Deny does not wrap %w arguments")
	}
	if got, want := err.Error(), "identity: invalid-token: verifying token: signature mismatch"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if got, want := (&identity.Error{Reason: identity.ReasonMissing}).Error(), "identity: missing-token"; got != want {
		t.Errorf("Error() without cause = %q, want %q", got, want)
	}
}

func TestParseServiceAccountUser(t *testing.T) {
	for _, tc := range []struct {
		user   string
		ns, sa string
		ok     bool
	}{
		{"system:serviceaccount:shop:cart", "shop", "cart", true},
		{"system:serviceaccount:shop:cart.v2", "shop", "cart.v2", true},
		{"alice", "", "", false},
		{"system:serviceaccount:shop", "", "", false},
		{"system:serviceaccount::cart", "", "", false},
		{"system:serviceaccount:shop:", "", "", false},
		{"system:serviceaccount:shop:cart:x", "", "", false},
		{"System:serviceaccount:shop:cart", "", "", false},
	} {
		ns, sa, ok := identity.ParseServiceAccountUser(tc.user)
		if ns != tc.ns || sa != tc.sa || ok != tc.ok {
			t.Errorf("ParseServiceAccountUser(%q) = %q, %q, %v; want %q, %q, %v", tc.user, ns, sa, ok, tc.ns, tc.sa, tc.ok)
		}
	}
}

func TestWorkloadOf(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id, err := identity.WorkloadID(td, "shop", "cart")
	if err != nil {
		t.Fatal(err)
	}
	if ns, sa, ok := identity.WorkloadOf(id); !ok || ns != "shop" || sa != "cart" {
		t.Errorf("WorkloadOf(%s) = %q, %q, %v", id, ns, sa, ok)
	}
	for _, s := range []string{"spiffe://cluster.local/ns/shop", "spiffe://cluster.local/ns/shop/sa/cart/x", "spiffe://cluster.local/sa/cart/ns/shop"} {
		if _, _, ok := identity.WorkloadOf(spiffeid.RequireFromString(s)); ok {
			t.Errorf("WorkloadOf(%s) accepted an ID of another shape", s)
		}
	}
}
