package identity_test

import (
	"strings"
	"testing"

	"github.com/meshca/meshca/identity"
)

func TestCredentialFromMetadata(t *testing.T) {
	for _, tc := range []struct {
		name    string
		md      map[string][]string
		want    identity.Credential
		problem identity.Reason
	}{
		{"bearer", map[string][]string{"authorization": {"Bearer abc"}}, identity.Credential{Token: "abc"}, ""},
		{"scheme in any case, cluster", map[string][]string{"authorization": {"bEaReR  abc "}, "clusterid": {"east"}}, identity.Credential{Token: "abc", ClusterID: "east"}, ""},
		{"none", map[string][]string{}, identity.Credential{}, identity.ReasonMissing},
		{"two", map[string][]string{"authorization": {"Bearer a", "Bearer b"}}, identity.Credential{}, identity.ReasonMissing},
		{"basic", map[string][]string{"authorization": {"Basic dXNlcjpwYXNz"}}, identity.Credential{}, identity.ReasonMissing},
		{"empty token", map[string][]string{"authorization": {"Bearer "}}, identity.Credential{}, identity.ReasonMissing},
		{"huge cluster ID", map[string][]string{"authorization": {"Bearer a"}, "clusterid": {strings.Repeat("x", 300)}}, identity.Credential{}, identity.ReasonUnknownCluster},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := identity.CredentialFromMetadata(func(k string) []string { return tc.md[k] })
			if identity.ReasonOf(err) != tc.problem || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v, reason %q", got, err, tc.want, tc.problem)
			}
		})
	}
}

func TestServesCluster(t *testing.T) {
	for _, tc := range []struct {
		own, id string
		want    bool
	}{
		{"", "", true},
		{"", "Kubernetes", true},
		{"", "east", false},
		{"east", "", true},
		{"east", "east", true},
		{"east", "Kubernetes", false},
		{"east", "west", false},
	} {
		if got := identity.ServesCluster(tc.own, tc.id); got != tc.want {
			t.Errorf("ServesCluster(%q, %q) = %v, want %v", tc.own, tc.id, got, tc.want)
		}
	}
}
