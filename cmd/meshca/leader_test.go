package main

import (
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// TestLeaderTimingFlags: the Lease timings a replica cannot keep are
// refused with the flags named; the defaults and sound combinations pass.
func TestLeaderTimingFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string // "" for accepted
	}{
		{nil, ""},
		{[]string{"--leader-lease-duration=5s", "--leader-renew-deadline=3s", "--leader-retry-period=500ms"}, ""},
		{[]string{"--leader-lease-duration=4s", "--leader-renew-deadline=3s", "--leader-retry-period=500ms"},
			"--leader-lease-duration (4s) must be longer than 4.5s, --leader-renew-deadline (3s) plus --leader-retry-period (500ms) and 1s"},
		{[]string{"--leader-lease-duration=12s", "--leader-renew-deadline=10s"},
			"--leader-lease-duration (12s) must be longer than 12s, --leader-renew-deadline (10s) plus --leader-retry-period (2s):"},
		{[]string{"--leader-lease-duration=3s", "--leader-renew-deadline=3s"}, "--leader-lease-duration (3s) must be longer than 5s"},
		{[]string{"--leader-renew-deadline=2s", "--leader-retry-period=2s"}, "--leader-renew-deadline (2s) must be longer than 1.2 × --leader-retry-period (2s)"},
		{[]string{"--leader-lease-duration=4500ms", "--leader-renew-deadline=3s"}, "--leader-lease-duration (4.5s) must be a whole number of seconds"},
		{[]string{"--leader-lease-duration=500ms", "--leader-renew-deadline=200ms", "--leader-retry-period=100ms"}, "at least 1s"},
		{[]string{"--leader-retry-period=0s"}, "must all be positive"},
		{[]string{"--leader-renew-deadline=-1s"}, "must all be positive"},
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
