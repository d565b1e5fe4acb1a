package policy_test

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/meshca/meshca/internal/policy"
)

func TestParseList(t *testing.T) {
	want := []string{"a.example", "b.example"}
	for _, in := range []string{
		`["a.example","b.example"]`,
		`[ "a.example", "b.example" ]`,
		`[a.example, b.example]`,
		`['a.example', "b.example"]`,
		"[\n  a.example,\n  b.example,\n]",
		"a.example,b.example",
		" a.example , b.example ,",
		"a.example\nb.example\n",
		"\n- a.example\n- b.example\n",
		"- 'a.example'\n- \"b.example\"",
		"a.example\n\nb.example",
	} {
		got, err := policy.ParseList(in)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("ParseList(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "  ", "[]", "\n"} {
		if got, err := policy.ParseList(in); err != nil || len(got) != 0 {
			t.Errorf("ParseList(%q) = %q, %v; want empty", in, got, err)
		}
	}
	// An explicit empty string is kept for validation to reject.
	if got, err := policy.ParseList(`["a.example", ""]`); err != nil || !slices.Equal(got, []string{"a.example", ""}) {
		t.Errorf(`ParseList(["a.example", ""]) = %q, %v`, got, err)
	}
	for _, in := range []string{`["a.example"`, `'a.example`, `["a.example", "b]`} {
		if got, err := policy.ParseList(in); !errors.Is(err, policy.ErrInvalid) {
			t.Errorf("ParseList(%q) = %q, %v; want ErrInvalid", in, got, err)
		}
	}
}

func TestParseConfigMap(t *testing.T) {
	for _, tc := range []struct {
		name    string
		data    map[string]string
		want    policy.Policy
		errPart []string
	}{
		{
			name: "no policy keys is the default",
			data: map[string]string{"other": "x"},
			want: policy.Default(),
		},
		{
			name: "nil data is the default",
			want: policy.Default(),
		},
		{
			name: "istio 1.0 keys",
			data: map[string]string{
				policy.KeyEnabled:  "true",
				policy.KeyMode:     "PERMISSIVE",
				policy.KeyExcluded: `["kubernetes.default.svc.cluster.local", "*.kube-system.svc.cluster.local"]`,
			},
			want: policy.Policy{Enabled: true, Mode: policy.ModePermissive, Excluded: []string{
				"*.kube-system.svc.cluster.local", "kubernetes.default.svc.cluster.local",
			}},
		},
		{
			name: "enabled alone means strict with no exclusions",
			data: map[string]string{policy.KeyEnabled: " TRUE "},
			want: policy.Policy{Enabled: true, Mode: policy.ModeStrict},
		},
		{
			name: "json",
			data: map[string]string{policy.KeyJSON: `{"enabled": true, "excludedServices": ["B.example."]}`},
			want: policy.Policy{Enabled: true, Mode: policy.ModeStrict, Excluded: []string{"b.example"}},
		},
		{
			name:    "both styles",
			data:    map[string]string{policy.KeyJSON: `{}`, policy.KeyEnabled: "true"},
			errPart: []string{"keep one style"},
		},
		{
			name: "every problem named",
			data: map[string]string{
				policy.KeyEnabled:  "yes please",
				policy.KeyMode:     "MUTUAL",
				policy.KeyExcluded: "ok.example, bad_name.example, *",
			},
			errPart: []string{`"yes please"`, `"MUTUAL"`, `"bad_name.example"`, `"*"`},
		},
		{
			name:    "json with an unknown field",
			data:    map[string]string{policy.KeyJSON: `{"enabled": true, "excluded": ["a.example"]}`},
			errPart: []string{`"excluded"`},
		},
		{
			name:    "json that does not parse",
			data:    map[string]string{policy.KeyJSON: `{"enabled": tru`},
			errPart: []string{"unexpected"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := policy.ParseConfigMap(tc.data)
			if len(tc.errPart) > 0 {
				if !errors.Is(err, policy.ErrInvalid) {
					t.Fatalf("ParseConfigMap = %v, %v; want ErrInvalid", got, err)
				}
				for _, p := range tc.errPart {
					if !strings.Contains(err.Error(), p) {
						t.Errorf("error %q does not mention %s", err, p)
					}
				}
				return
			}
			if err != nil || !got.Equal(tc.want) || !slices.Equal(got.Excluded, tc.want.Excluded) {
				t.Errorf("ParseConfigMap = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestFormatConfigMap(t *testing.T) {
	p := policy.Policy{Enabled: true, Mode: policy.ModePermissive, Excluded: []string{"B.example", "a.example"}}

	t.Run("istio keys, others kept", func(t *testing.T) {
		in := map[string]string{"mesh": "unrelated: true", policy.KeyEnabled: "false"}
		orig := maps.Clone(in)
		out, err := policy.FormatConfigMap(in, p)
		if err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(in, orig) {
			t.Errorf("input modified: %v", in)
		}
		want := map[string]string{
			"mesh":             "unrelated: true",
			policy.KeyEnabled:  "true",
			policy.KeyMode:     "PERMISSIVE",
			policy.KeyExcluded: `["a.example","b.example"]`,
		}
		if !maps.Equal(out, want) {
			t.Errorf("FormatConfigMap = %v, want %v", out, want)
		}
		back, err := policy.ParseConfigMap(out)
		if err != nil || !back.Equal(p) {
			t.Errorf("round trip = %v, %v", back, err)
		}
	})

	t.Run("json style kept", func(t *testing.T) {
		out, err := policy.FormatConfigMap(map[string]string{policy.KeyJSON: "{}", "x": "y"}, p)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := out[policy.KeyEnabled]; ok || out["x"] != "y" {
			t.Errorf("FormatConfigMap = %v", out)
		}
		back, err := policy.ParseConfigMap(out)
		if err != nil || !back.Equal(p) {
			t.Errorf("round trip = %v, %v", back, err)
		}
	})

	t.Run("empty exclusions written explicitly", func(t *testing.T) {
		out, err := policy.FormatConfigMap(nil, policy.Policy{Enabled: true})
		if err != nil {
			t.Fatal(err)
		}
		if out[policy.KeyExcluded] != "[]" {
			t.Errorf("%s = %q, want []", policy.KeyExcluded, out[policy.KeyExcluded])
		}
	})

	t.Run("invalid policy refused", func(t *testing.T) {
		if _, err := policy.FormatConfigMap(nil, policy.Policy{Excluded: []string{"a..b"}}); !errors.Is(err, policy.ErrInvalid) {
			t.Errorf("FormatConfigMap = %v, want ErrInvalid", err)
		}
	})
}
