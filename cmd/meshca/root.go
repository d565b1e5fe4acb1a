package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/rotation"
)

func newCARootCommand() *cobra.Command {
	o := &adminClientOptions{}
	cmd := &cobra.Command{
		Use:   "root",
		Short: "Show and rotate the root CA: status, prepare, activate, retire, rotate",
		Long: `Rotate meshca's root CA without breaking a handshake.

  prepare   a new root joins the trust bundle, which is pushed to every proxy;
            nothing is signed by it yet
  activate  once the proxies have ACKed a bundle with the new root, it signs
            new intermediates and leaves; agents renew promptly
  retire    once no live certificate chains to the old root, it leaves the
            bundle

"rotate" runs all three in order, waiting for each gate. "status" shows every
root, how many connected proxies have ACKed it, how many live certificates it
still covers, and what blocks the next step.`,
	}
	o.bind(cmd.PersistentFlags())
	cmd.AddCommand(newRootStatusCommand(o))
	for _, step := range []ca.Step{ca.StepPrepare, ca.StepActivate, ca.StepRetire} {
		cmd.AddCommand(newRootStepCommand(o, step))
	}
	cmd.AddCommand(newRootRotateCommand(o))
	return cmd
}

func newRootStatusCommand(o *adminClientOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Roots, their slots, ACKs and live certificates, and what blocks the next step",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			var st rotation.Status
			if err := c.Do(cmd.Context(), http.MethodGet, "/v1/roots", nil, &st); err != nil {
				return err
			}
			return printRootStatus(cmd.OutOrStdout(), st, o.asJSON)
		},
	}
}

func newRootStepCommand(o *adminClientOptions, step ca.Step) *cobra.Command {
	var req admin.StepRequest
	short := map[ca.Step]string{
		ca.StepPrepare:  "Add a new root to the trust bundle (it signs nothing yet)",
		ca.StepActivate: "Make the prepared root sign, once the proxies have ACKed it",
		ca.StepRetire:   "Drop the old root from the bundle, once nothing live chains to it",
	}[step]
	cmd := &cobra.Command{
		Use:   string(step),
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			var st rotation.Status
			err = c.Do(cmd.Context(), http.MethodPost, "/v1/roots/"+string(step), req, &st)
			if err != nil {
				if st.Phase != "" {
					_ = printRootStatus(cmd.ErrOrStderr(), st, o.asJSON)
				}
				return err
			}
			for _, w := range st.Warnings {
				fmt.Fprintln(cmd.ErrOrStderr(), "WARNING:", w)
			}
			return printRootStatus(cmd.OutOrStdout(), st, o.asJSON)
		},
	}
	fs := cmd.Flags()
	if step == ca.StepActivate {
		fs.Float64Var(&req.MinAcked, "min-acked", 0, "share of proxies that must have ACKed the new root (default: the server's, normally all)")
	}
	if step != ca.StepPrepare {
		fs.BoolVar(&req.Force, "force", false, "take the step although its safety check fails (handshakes may break)")
	}
	return cmd
}

func newRootRotateCommand(o *adminClientOptions) *cobra.Command {
	var (
		minAcked float64
		poll     time.Duration
		timeout  time.Duration
	)
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Prepare, activate and retire a new root, waiting for each step's gate",
		Long: `Run a whole root rotation: prepare a new root, wait until the proxies have
ACKed it, activate it, wait until no live certificate chains to the old root,
and retire that. A rotation already under way is continued from its phase.
Progress is printed whenever it changes.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := o.client()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			return rotateRoot(ctx, c, cmd.OutOrStdout(), minAcked, poll)
		},
	}
	fs := cmd.Flags()
	fs.Float64Var(&minAcked, "min-acked", 0, "share of proxies that must have ACKed the new root before activation (default: the server's, normally all)")
	fs.DurationVar(&poll, "poll", 2*time.Second, "how often to look at the rotation's progress")
	fs.DurationVar(&timeout, "timeout", 0, "give up after this long (0: wait as long as it takes); the rotation stays in its phase and can be continued")
	return cmd
}

// rotateRoot drives the steps in order from whatever phase the server is in.
func rotateRoot(ctx context.Context, c *admin.Client, w io.Writer, minAcked float64, poll time.Duration) error {
	// started: a rotation is under way, so idle means it has completed.
	// Only a step taken or a phase past idle says so, never a refused
	// prepare.
	started := false
	last := ""
	wait := func(step ca.Step, phase ca.Phase) error {
		select {
		case <-ctx.Done():
			return fmt.Errorf("stopped while waiting to %s (the rotation stays %s; run `meshca root rotate` again to continue): %w", step, phase, ctx.Err())
		case <-time.After(poll):
			return nil
		}
	}
	for {
		var st rotation.Status
		if err := c.Do(ctx, http.MethodGet, "/v1/roots", nil, &st); err != nil {
			return err
		}
		var step ca.Step
		switch st.Phase {
		case ca.PhaseIdle:
			if started {
				fmt.Fprintf(w, "%s  rotation complete: root %s signs alone\n", stamp(), shortFP(st.Roots[0].Fingerprint))
				return nil
			}
			step = ca.StepPrepare
		default:
			step = st.NextStep
			started = true
		}
		if len(st.Blockers) > 0 {
			if msg := strings.Join(st.Blockers, "; "); msg != last {
				fmt.Fprintf(w, "%s  waiting to %s: %s\n", stamp(), step, msg)
				last = msg
			}
			if err := wait(step, st.Phase); err != nil {
				return err
			}
			continue
		}
		req := admin.StepRequest{}
		if step == ca.StepActivate {
			req.MinAcked = minAcked
		}
		var after rotation.Status
		err := c.Do(ctx, http.MethodPost, "/v1/roots/"+string(step), req, &after)
		var apiErr *admin.APIError
		if errors.As(err, &apiErr) && apiErr.HTTPStatus == http.StatusConflict {
			// The gate closed again between the status and the step (a
			// proxy reconnected), or this replica does not lead (behind
			// a Service, the next request may reach the one that does):
			// look again after a poll.
			if msg := string(step) + " refused: " + apiErr.Body.Error; msg != last {
				fmt.Fprintf(w, "%s  %s, will retry\n", stamp(), msg)
				last = msg
			}
			if err := wait(step, st.Phase); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		started = true
		last = ""
		fmt.Fprintf(w, "%s  %s done: %s\n", stamp(), step, phaseLine(after))
	}
}

func stamp() string { return time.Now().UTC().Format("15:04:05") }

func phaseLine(st rotation.Status) string {
	var parts []string
	for _, r := range st.Roots {
		parts = append(parts, fmt.Sprintf("%s %s", r.Slot, shortFP(r.Fingerprint)))
	}
	return fmt.Sprintf("phase %s, bundle [%s]", st.Phase, strings.Join(parts, ", "))
}

func printRootStatus(w io.Writer, st rotation.Status, asJSON bool) error {
	if asJSON {
		return printJSON(w, st)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	p := func(format string, args ...any) { fmt.Fprintf(tw, format+"\n", args...) }
	phase := string(st.Phase)
	switch {
	case st.Phase == ca.PhaseActivated && !st.ActivatedAt.IsZero():
		phase += " since " + st.ActivatedAt.UTC().Format(time.RFC3339)
	case st.Phase == ca.PhasePrepared && !st.PreparedAt.IsZero():
		phase += " since " + st.PreparedAt.UTC().Format(time.RFC3339)
	}
	p("phase\t%s", phase)
	p("proxies\t%d connected (subscribed to the trust bundle)", st.Proxies)
	p("")
	p("SLOT\tROOT\tVALID UNTIL\tACKED BY\tLIVE CERTS\t")
	for _, r := range st.Roots {
		live := fmt.Sprint(r.LiveLeaves)
		if r.LiveLeaves > 0 && !r.LiveLeavesExpireBy.IsZero() {
			live += " (last expires " + r.LiveLeavesExpireBy.UTC().Format(time.RFC3339) + ")"
		}
		p("%s\t%s\t%s\t%d/%d\t%s\t", r.Slot, shortFP(r.Fingerprint), r.NotAfter.UTC().Format(time.RFC3339), r.AckedProxies, st.Proxies, live)
	}
	p("")
	switch {
	case st.NextStep == "":
		p("next step\tnone: one root (start a rotation with `meshca root prepare` or `meshca root rotate`)")
	case len(st.Blockers) == 0:
		p("next step\t%s: allowed now", st.NextStep)
	default:
		p("next step\t%s: blocked", st.NextStep)
		for _, b := range st.Blockers {
			p("  \t%s", b)
		}
	}
	for _, m := range st.Missing {
		line := m.Identity
		if m.Node != "" {
			line += " (node " + m.Node + ")"
		}
		line += ": " + m.State
		if m.Error != "" {
			line += ": " + m.Error
		}
		p("  missing\t%s", line)
	}
	return tw.Flush()
}
