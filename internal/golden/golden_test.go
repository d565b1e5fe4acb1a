package golden

import "testing"

func TestFirstDiff(t *testing.T) {
	for _, tt := range []struct{ want, got, say string }{
		{"a\nb\nc", "a\nx\nc", `line 2: want "b", got "x"`},
		{"a\nb", "a\nb\nc", `line 3: want "", got "c"`},
		{"a\n", "a\r\n", `line 1: want "a", got "a\r"`},
		{"a", "a", "same lines, different bytes"},
	} {
		if got := firstDiff(tt.want, tt.got); got != tt.say {
			t.Errorf("firstDiff(%q, %q) = %s, want %s", tt.want, tt.got, got, tt.say)
		}
	}
}
