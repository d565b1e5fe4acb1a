package main

import (
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// TestLeaderTimingFlags: the flags reach leader.CheckTimings, which refuses
// what the Lease election cannot keep, and its error names the flags and
// their values; a flag set to 0 is refused, not taken as the default.
func TestLeaderTimingFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string // "" for accepted
	}{
		{nil, ""},
		{[]string{"--leader-lease-duration=5s", "--leader-renew-deadline=3s", "--leader-retry-period=500ms"}, ""},
		{[]string{"--leader-lease-duration=4s", "--leader-renew-deadline=3s", "--leader-retry-period=500ms"},
			"--leader-lease-duration (4s), --leader-renew-deadline (3s), --leader-retry-period (500ms): leader: lease duration 4s must be longer than 4.5s"},
		{[]string{"--leader-renew-deadline=2s", "--leader-retry-period=2s"},
			"--leader-lease-duration (15s), --leader-renew-deadline (2s), --leader-retry-period (2s): leader: renew deadline 2s must be longer than 1.2 × retry period 2s"},
		{[]string{"--leader-retry-period=0s"}, "--leader-retry-period (0s): leader: lease duration 15s, renew deadline 10s and retry period 0s must all be positive"},
	} {
		var o replicaOptions
		fs := pflag.NewFlagSet("server", pflag.ContinueOnError)
		o.bind(fs)
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		err := o.checkLeaseTimings()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%v: %v", tc.args, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%v: %v, want %q", tc.args, err, tc.want)
		}
	}
}
