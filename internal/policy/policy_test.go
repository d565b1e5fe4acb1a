package policy_test

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/meshca/meshca/internal/policy"
)

func TestNormalizeFQDN(t *testing.T) {
	label63 := strings.Repeat("a", 63)
	// Four 63-character labels and dots make 255; trim to the limits.
	name253 := label63 + "." + label63 + "." + label63 + "." + strings.Repeat("b", 61)
	for _, tc := range []struct {
		in, want string
		errPart  string // non-empty: expect an error containing it
	}{
		{in: "foo.bar.svc.cluster.local", want: "foo.bar.svc.cluster.local"},
		{in: "Foo.BAR.svc.Cluster.Local.", want: "foo.bar.svc.cluster.local"},
		{in: "localhost", want: "localhost"},
		{in: "123.45-6.example", want: "123.45-6.example"},
		{in: "xn--bcher-kva.example", want: "xn--bcher-kva.example"},
		{in: label63 + ".example", want: label63 + ".example"},
		{in: name253, want: name253},
		{in: name253 + ".", want: name253},
		{in: "", errPart: "empty name"},
		{in: ".", errPart: "empty name"},
		{in: "a..b", errPart: "empty label"},
		{in: ".a.b", errPart: "empty label"},
		{in: "a.b..", errPart: "empty label"},
		{in: label63 + "a.example", errPart: "longer than 63"},
		{in: name253 + "b", errPart: "longer than 253"},
		{in: "-a.example", errPart: "hyphen"},
		{in: "a-.example", errPart: "hyphen"},
		{in: "a_b.example", errPart: "invalid character '_'"},
		{in: "a b.example", errPart: "invalid character ' '"},
		{in: "bücher.example", errPart: "xn--"},
		{in: "BÜCHER.example", errPart: "xn--"},
		{in: "\u212Aubernetes.default.svc", errPart: "non-ASCII"}, // Kelvin sign lower-cases to k
		{in: "*.example", errPart: "wildcard"},
		{in: "a.*.example", errPart: "wildcard"},
	} {
		got, err := policy.NormalizeFQDN(tc.in)
		if tc.errPart != "" {
			if err == nil || !strings.Contains(err.Error(), tc.errPart) || !errors.Is(err, policy.ErrInvalid) {
				t.Errorf("NormalizeFQDN(%q) = %q, %v; want an ErrInvalid containing %q", tc.in, got, err, tc.errPart)
			}
			if err != nil && !strings.Contains(err.Error(), tc.in) {
				t.Errorf("NormalizeFQDN(%q): error %q does not name the input", tc.in, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("NormalizeFQDN(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

func TestNormalize(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      policy.Policy
		want    policy.Policy
		errPart []string // every one must appear in the error
	}{
		{
			name: "default is normalized",
			in:   policy.Default(),
			want: policy.Default(),
		},
		{
			name: "empty mode is strict",
			in:   policy.Policy{Enabled: true},
			want: policy.Policy{Enabled: true, Mode: policy.ModeStrict},
		},
		{
			name: "mode spelling",
			in:   policy.Policy{Enabled: true, Mode: " permissive "},
			want: policy.Policy{Enabled: true, Mode: policy.ModePermissive},
		},
		{
			name: "sorted, lower-cased, de-duplicated",
			in: policy.Policy{Enabled: true, Mode: policy.ModeStrict, Excluded: []string{
				"b.example.", "A.example", "*.Z.example", "a.example.", "B.EXAMPLE", "*.z.example.",
			}},
			want: policy.Policy{Enabled: true, Mode: policy.ModeStrict, Excluded: []string{
				"*.z.example", "a.example", "b.example",
			}},
		},
		{
			name: "empty list is nil",
			in:   policy.Policy{Excluded: []string{}},
			want: policy.Policy{Mode: policy.ModeStrict},
		},
		{
			name:    "disable is not a mode",
			in:      policy.Policy{Enabled: true, Mode: policy.ModeDisable},
			errPart: []string{"enabled to false"},
		},
		{
			name:    "unknown mode",
			in:      policy.Policy{Mode: "MUTUAL"},
			errPart: []string{`"MUTUAL"`},
		},
		{
			name:    "bad wildcards",
			in:      policy.Policy{Excluded: []string{"*", "*.", "a.*.b", "*a.b", "**.b", "*.*.b", "b.*"}},
			errPart: []string{`"*"`, `"*."`, `"a.*.b"`, `"*a.b"`, `"**.b"`, `"*.*.b"`, `"b.*"`},
		},
		{
			name:    "every problem is named",
			in:      policy.Policy{Mode: "x", Excluded: []string{"ok.example", "", "bad_name.example", "ok.example"}},
			errPart: []string{`mode "x"`, `excluded service ""`, `"bad_name.example"`},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.in.Normalize()
			verr := tc.in.Validate()
			if len(tc.errPart) > 0 {
				if err == nil || !errors.Is(err, policy.ErrInvalid) {
					t.Fatalf("Normalize = %v, %v; want ErrInvalid", got, err)
				}
				for _, p := range tc.errPart {
					if !strings.Contains(err.Error(), p) {
						t.Errorf("error %q does not mention %s", err, p)
					}
				}
				if verr == nil || verr.Error() != err.Error() {
					t.Errorf("Validate = %v, want the same as Normalize", verr)
				}
				return
			}
			if err != nil || verr != nil {
				t.Fatalf("Normalize: %v; Validate: %v", err, verr)
			}
			if got.Enabled != tc.want.Enabled || got.Mode != tc.want.Mode || !slices.Equal(got.Excluded, tc.want.Excluded) {
				t.Errorf("Normalize = %+v, want %+v", got, tc.want)
			}
			if (tc.want.Excluded == nil) != (got.Excluded == nil) {
				t.Errorf("Excluded = %#v, want %#v", got.Excluded, tc.want.Excluded)
			}
			again, err := got.Normalize()
			if err != nil || !again.Equal(got) || !slices.Equal(again.Excluded, got.Excluded) {
				t.Errorf("Normalize is not idempotent: %+v then %+v", got, again)
			}
		})
	}
}

func TestModeFor(t *testing.T) {
	excl := []string{"Kubernetes.Default.svc.cluster.local.", "*.kube-system.svc.cluster.local", "legacy.example"}
	strict := policy.Policy{Enabled: true, Excluded: excl}
	permissive := policy.Policy{Enabled: true, Mode: policy.ModePermissive, Excluded: excl}
	off := policy.Policy{Enabled: false, Mode: policy.ModeStrict, Excluded: excl}
	for _, tc := range []struct {
		p    policy.Policy
		fqdn string
		want policy.Mode
	}{
		{strict, "web.shop.svc.cluster.local", policy.ModeStrict},
		{permissive, "web.shop.svc.cluster.local", policy.ModePermissive},
		{off, "web.shop.svc.cluster.local", policy.ModeDisable},
		{policy.Default(), "web.shop.svc.cluster.local", policy.ModeDisable},
		// Exact exclusions, in any case and with or without the root dot.
		{strict, "kubernetes.default.svc.cluster.local", policy.ModeDisable},
		{strict, "KUBERNETES.default.svc.cluster.local.", policy.ModeDisable},
		{strict, "legacy.example", policy.ModeDisable},
		{strict, "sub.legacy.example", policy.ModeStrict},
		// A wildcard needs at least one more label.
		{strict, "dns.kube-system.svc.cluster.local", policy.ModeDisable},
		{strict, "a.b.kube-system.svc.cluster.local", policy.ModeDisable},
		{strict, "kube-system.svc.cluster.local", policy.ModeStrict},
		{strict, "xkube-system.svc.cluster.local", policy.ModeStrict},
		// A name that is not an FQDN matches no exclusion.
		{strict, "", policy.ModeStrict},
		{strict, "legacy..example", policy.ModeStrict},
	} {
		if got := tc.p.ModeFor(tc.fqdn); got != tc.want {
			t.Errorf("%v.ModeFor(%q) = %s, want %s", tc.p, tc.fqdn, got, tc.want)
		}
	}
}

func TestEqual(t *testing.T) {
	a := policy.Policy{Enabled: true, Excluded: []string{"b.example", "A.example."}}
	b := policy.Policy{Enabled: true, Mode: policy.ModeStrict, Excluded: []string{"a.example", "b.example"}}
	if !a.Equal(b) {
		t.Errorf("%v and %v should be equal", a, b)
	}
	c := b
	c.Mode = policy.ModePermissive
	if a.Equal(c) {
		t.Errorf("%v and %v should differ", a, c)
	}
}

func TestDefaultIsFresh(t *testing.T) {
	d := policy.Default()
	d.Excluded[0] = "changed.example"
	if got := policy.Default().Excluded[0]; got != policy.DefaultExcluded {
		t.Errorf("Default shares its slice: %q", got)
	}
}
