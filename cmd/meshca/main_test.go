package main

import (
	"context"
	"os"
	"os/exec"
	"testing"
)

// runMainEnv, set to 1, makes the test binary run meshca with its own
// arguments, as the meshca binary would, instead of the tests: see
// meshcaChild.
const runMainEnv = "MESHCA_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// meshcaChild returns a command that runs meshca with args in a process of
// its own: this test binary, which TestMain turns into meshca. The child's
// environment carries that on, so a meshca that starts itself again (as
// `bench sds --fleet process` does) starts meshca too.
func meshcaChild(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, os.Args[0], args...)
	cmd.Env = append(os.Environ(), runMainEnv+"=1")
	return cmd
}
