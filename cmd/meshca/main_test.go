package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"testing"
)

// mainArgsEnv, when set, makes the test binary run meshca with these
// newline-separated arguments instead of the tests: tests that must kill a real
// meshca process start the test binary itself.
const mainArgsEnv = "MESHCA_TEST_MAIN_ARGS"

func TestMain(m *testing.M) {
	if args := os.Getenv(mainArgsEnv); args != "" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		cmd := newRootCommand(os.Stdout, os.Stderr)
		cmd.SetArgs(strings.Split(args, "\n"))
		if err := cmd.ExecuteContext(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "meshca:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}
