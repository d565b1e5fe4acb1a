// Command meshca is the meshca mesh certificate authority: the CA server,
// the development mode that runs everything locally, and the client and
// admin commands.
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run runs meshca with args until the command ends or SIGINT or SIGTERM
// cancels it, and returns the process's exit status: 0, or 1 once it has
// printed "meshca: <error>" on stderr.
func run(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd := newRootCommand(stdout, stderr)
	cmd.SetArgs(args)
	if err := cmd.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(stderr, "meshca:", err)
		return 1
	}
	return 0
}

type globalOptions struct {
	logLevel  string
	logFormat string
	stderr    io.Writer
}

func newRootCommand(stdout, stderr io.Writer) *cobra.Command {
	g := &globalOptions{stderr: stderr}
	root := &cobra.Command{
		Use:           "meshca",
		Short:         "meshca: a mesh certificate authority that issues SPIFFE identities to workloads",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	root.PersistentFlags().StringVar(&g.logFormat, "log-format", "text", "log format: text or json")
	root.AddCommand(
		newServerCommand(g),
		newDevCommand(g),
		newCertCommand(g),
		newBenchCommand(g),
		newAuditCommand(),
		newCARootCommand(),
		newMTLSCommand(),
		newAgentCommand(g),
		newSDSCommand(),
		newVersionCommand(),
	)
	return root
}

func (g *globalOptions) logger() (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(g.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch strings.ToLower(g.logFormat) {
	case "text":
		return slog.New(slog.NewTextHandler(g.stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(g.stderr, opts)), nil
	default:
		return nil, fmt.Errorf("--log-format must be text or json, not %q", g.logFormat)
	}
}
