package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// TestBenchSDS runs `meshca bench sds` on a small fleet, in this process
// and, with the fleet in a process of its own, as a user runs it, and
// checks that the report adds up. No timing is asserted: the figures
// depend on the machine.
func TestBenchSDS(t *testing.T) {
	const streams, pushes = 50, 2
	for _, fleet := range []string{"in-process", "process"} {
		t.Run(fleet, func(t *testing.T) {
			args := []string{"bench", "sds", "--streams", "50", "--pushes", "2", "--fleet", fleet,
				"--marshal-duration", "20ms", "--json"}
			var out string
			if fleet == "in-process" {
				out = meshcaCmd(t, args...)
			} else {
				// As from a shell: meshca starts itself again for the
				// fleet, which in a child of the test binary is meshca too.
				var errs bytes.Buffer
				cmd := meshcaChild(t.Context(), args...)
				cmd.Stderr = &errs
				b, err := cmd.Output()
				if err != nil {
					t.Fatalf("meshca %s: %v\nstderr: %s", strings.Join(args, " "), err, errs.String())
				}
				out = string(b)
			}
			var rep sdsBenchReport
			if err := json.Unmarshal([]byte(out), &rep); err != nil {
				t.Fatalf("report is not JSON: %v\n%s", err, out)
			}
			if rep.Streams != streams || rep.Connections != streams || rep.Fleet != fleet || rep.Protocol != "sotw" || rep.Network != "unix" {
				t.Errorf("report describes %d streams on %d connections, fleet %q, %s over %s", rep.Streams, rep.Connections, rep.Fleet, rep.Protocol, rep.Network)
			}
			if len(rep.Pushes) != pushes {
				t.Fatalf("%d bundle changes reported, want %d", len(rep.Pushes), pushes)
			}
			for i, p := range rep.Pushes {
				if p.Acked != streams || p.Connected != streams || p.Holding != streams || p.Ms <= 0 {
					t.Errorf("change %d: %+v, want all %d streams ACKed, connected and holding the root", i+1, p, streams)
				}
			}
			if want := int64(streams * (1 + pushes)); rep.ClientACKs != want {
				t.Errorf("fleet sent %d ACKs, want %d: one per stream for the first bundle and each change", rep.ClientACKs, want)
			}
			if rep.Marshal.NsPerOp <= 0 || rep.Marshal.Bytes <= 0 || rep.Marshal.Ops <= 0 || rep.ConnectMs <= 0 {
				t.Errorf("baseline %+v, connect %v ms", rep.Marshal, rep.ConnectMs)
			}
			// Each stream has at least its gRPC handler in the server and its
			// receive loop in the fleet.
			if rep.Server.GoroutinesPerStream < 1 {
				t.Errorf("server goroutines per stream %v, want at least 1", rep.Server.GoroutinesPerStream)
			}
			switch {
			case fleet == "process" && (rep.Client == nil || rep.Client.GoroutinesPerStream < 1 || rep.Combined):
				t.Errorf("child fleet measured as %+v (combined %v)", rep.Client, rep.Combined)
			case fleet == "in-process" && (rep.Client != nil || !rep.Combined):
				t.Errorf("in-process fleet reported apart from the server: %+v", rep.Client)
			}
			if rep.Targets.PushMs != 2000 || rep.Targets.HeapPerStream != 20<<10 {
				t.Errorf("targets %+v, want 2 s and 20 KiB", rep.Targets)
			}
		})
	}
	t.Run("text", func(t *testing.T) {
		out := meshcaCmd(t, "bench", "sds", "--streams", "10", "--pushes", "1", "--fleet", "in-process", "--network", "tcp", "--delta",
			"--marshal-duration", "10ms")
		for _, want := range []string{"10 streams (delta) on 10 connections", "Acked 10 of 10 connected; Status: 10 streams hold the new root",
			"ACKs sent    20 by the fleet", "every change pushed and ACKed by all 10 in < 2.00 s: "} {
			if !strings.Contains(out, want) {
				t.Errorf("report does not say %q:\n%s", want, out)
			}
		}
	})
}
