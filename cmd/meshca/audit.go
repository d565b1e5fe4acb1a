package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/caclient"
)

// auditOptions locate the ledgers an audit command reads.
type auditOptions struct {
	dataDir string
	dirs    []string
}

func (o *auditOptions) bind(fs *pflag.FlagSet) {
	fs.StringVar(&o.dataDir, "data-dir", ".meshca-dev", "data directory of the server (its ledger is <data-dir>/audit)")
	fs.StringSliceVar(&o.dirs, "audit-dir", nil, "ledger directories to read instead, one per replica (merged by time)")
}

// with opens the ledgers read-only (a running server keeps writing them),
// calls fn and closes them.
func (o *auditOptions) with(fn func([]*audit.Ledger) error) error {
	dirs := o.dirs
	if len(dirs) == 0 {
		dirs = []string{filepath.Join(o.dataDir, devAuditDir)}
	}
	ls := make([]*audit.Ledger, 0, len(dirs))
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for _, d := range dirs {
		l, err := audit.OpenReadOnly(d)
		if err != nil {
			return err
		}
		ls = append(ls, l)
	}
	return fn(ls)
}

func newAuditCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Read, verify and export the audit ledger of issued certificates and denials",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newAuditListCommand(), newAuditShowCommand(), newAuditVerifyCommand(), newAuditExportCommand(), newAuditStatsCommand())
	return cmd
}

// filterOptions are the record filters of list and export.
type filterOptions struct {
	f                          audit.Filter
	since, until               string
	validNow                   bool
	includeCheckpoints, asJSON bool
}

func (o *filterOptions) bind(fs *pflag.FlagSet) {
	fs.StringVar(&o.f.SPIFFEID, "spiffe-id", "", "only records of this SPIFFE ID (issued to it, or claimed by a denied caller)")
	fs.StringVar(&o.f.Namespace, "namespace", "", "only records of this namespace")
	fs.StringVar(&o.f.Serial, "serial", "", "only the record of this serial (hex)")
	fs.StringVar(&o.since, "since", "", "only records at or after this time (RFC 3339) or this long ago (e.g. 1h)")
	fs.StringVar(&o.until, "until", "", "only records before this time (RFC 3339)")
	fs.BoolVar(&o.f.Denied, "denied", false, "only denials")
	fs.BoolVar(&o.validNow, "valid-now", false, "only certificates valid now")
	fs.IntVar(&o.f.Limit, "limit", 0, "at most this many records (0: all)")
}

func (o *filterOptions) filter(now time.Time) (audit.Filter, error) {
	f := o.f
	var err error
	if f.Since, err = parseWhen(o.since, now); err != nil {
		return f, fmt.Errorf("--since: %w", err)
	}
	if f.Until, err = parseWhen(o.until, now); err != nil {
		return f, fmt.Errorf("--until: %w", err)
	}
	if o.validNow {
		f.ValidAt = now
	}
	if !o.includeCheckpoints && !f.Denied {
		f.Kinds = []audit.Kind{audit.KindIssued, audit.KindDenied, audit.KindAdmin}
	}
	return f, nil
}

// parseWhen reads an RFC 3339 time or a duration before now.
func parseWhen(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(s); err == nil {
		return now.Add(-d), nil
	}
	return time.Parse(time.RFC3339, s)
}

func newAuditListCommand() *cobra.Command {
	var (
		o  auditOptions
		fo filterOptions
	)
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List issuances, denials and admin actions, oldest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, err := fo.filter(time.Now())
			if err != nil {
				return err
			}
			return o.with(func(ls []*audit.Ledger) error {
				w := cmd.OutOrStdout()
				var tw *tabwriter.Writer
				if !fo.asJSON {
					tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
					fmt.Fprintln(tw, "TIME\tKIND\tSERIAL\tSPIFFE ID\tPOD\tREASON\tPEER")
				}
				enc := json.NewEncoder(w)
				for m, err := range audit.MergeQuery(cmd.Context(), ls, f) {
					if err != nil {
						return err
					}
					r := m.Record
					if fo.asJSON {
						if err := enc.Encode(r); err != nil {
							return err
						}
						continue
					}
					id, pod := r.SPIFFEID, ""
					if id == "" {
						id = r.ClaimedID
					}
					if r.PodName != "" {
						pod = r.Namespace + "/" + r.PodName
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Time.Format(time.RFC3339), r.Kind, dash(r.Serial), dash(id), dash(pod), dash(r.Reason+r.Action), dash(r.Peer+r.Actor))
				}
				if tw != nil {
					return tw.Flush()
				}
				return nil
			})
		},
	}
	o.bind(cmd.Flags())
	fo.bind(cmd.Flags())
	cmd.Flags().BoolVar(&fo.asJSON, "json", false, "print records as JSON lines")
	return cmd
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newAuditShowCommand() *cobra.Command {
	var o auditOptions
	cmd := &cobra.Command{
		Use:   "show SERIAL",
		Short: "Show the full record of the certificate with this serial",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.with(func(ls []*audit.Ledger) error {
				for m, err := range audit.MergeQuery(cmd.Context(), ls, audit.Filter{Serial: args[0], Kinds: []audit.Kind{audit.KindIssued}}) {
					if err != nil {
						return err
					}
					return printJSON(cmd.OutOrStdout(), m.Record)
				}
				return fmt.Errorf("no certificate with serial %s in the ledger", args[0])
			})
		},
	}
	o.bind(cmd.Flags())
	return cmd
}

func newAuditVerifyCommand() *cobra.Command {
	var (
		o      auditOptions
		bundle string
	)
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Walk the hash chain and the signed checkpoints; print what was checked and the first broken link",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var opts audit.VerifyOptions
			if bundle == "" && len(o.dirs) == 0 {
				// Every root that ever signed, kept by the server; the
				// current bundle lacks roots retired by a rotation.
				bundle = filepath.Join(o.dataDir, devAuditDir, auditRootsFile)
				if _, err := os.Stat(bundle); err != nil {
					bundle = filepath.Join(o.dataDir, devBundleFile)
				}
			}
			if bundle != "" {
				roots, err := caclient.LoadBundle(bundle)
				if err != nil {
					return fmt.Errorf("--ca-bundle: %w", err)
				}
				opts.Roots = roots
			}
			return o.with(func(ls []*audit.Ledger) error {
				broken := false
				for _, l := range ls {
					rep, err := l.Verify(cmd.Context(), opts)
					if err != nil && rep.Failure == nil {
						return err
					}
					writeReport(cmd.OutOrStdout(), l.Dir(), rep, len(opts.Roots))
					broken = broken || rep.Failure != nil
				}
				if broken {
					return errors.New("the audit ledger does not verify")
				}
				return nil
			})
		},
	}
	o.bind(cmd.Flags())
	cmd.Flags().StringVar(&bundle, "ca-bundle", "", "trust bundle the checkpoint signers must chain to (default with --data-dir: every root the server has used, <data-dir>/audit/roots.pem, else its root-cert.pem)")
	return cmd
}

func writeReport(w io.Writer, dir string, r audit.Report, roots int) {
	fmt.Fprintf(w, "ledger %s\n", dir)
	fmt.Fprintf(w, "  segments     %d\n  records      %d (seq %d..%d)\n  checkpoints  %d signatures verified", r.Segments, r.Records, r.FirstSeq, r.LastSeq, r.Checkpoints)
	if roots > 0 {
		fmt.Fprintf(w, ", signers chained to %d trusted root(s)", roots)
	}
	fmt.Fprintf(w, "\n  last signed  seq %d (head.json: %d); records after it are chained, not yet signed\n", r.LastCheckpointSeq, r.HeadSeq)
	if r.PrunedThrough > 0 {
		fmt.Fprintf(w, "  pruned       through seq %d\n", r.PrunedThrough)
	}
	if f := r.Failure; f != nil {
		fmt.Fprintf(w, "BROKEN at %s line %d, seq %d (found %d): %s\n", f.Segment, f.Line, f.Seq, f.Found, f.Problem)
		return
	}
	fmt.Fprintln(w, "OK")
}

func newAuditExportCommand() *cobra.Command {
	var (
		o  auditOptions
		fo filterOptions
	)
	cmd := &cobra.Command{
		Use:   "export",
		Short: "Write records as JSON lines, exactly as stored (checkpoints included unless filtered)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fo.includeCheckpoints = true
			f, err := fo.filter(time.Now())
			if err != nil {
				return err
			}
			return o.with(func(ls []*audit.Ledger) error {
				for _, l := range ls {
					if _, err := l.Export(cmd.Context(), cmd.OutOrStdout(), f); err != nil {
						return err
					}
				}
				return nil
			})
		},
	}
	o.bind(cmd.Flags())
	fo.bind(cmd.Flags())
	return cmd
}

func newAuditStatsCommand() *cobra.Command {
	var o auditOptions
	cmd := &cobra.Command{
		Use:   "stats",
		Short: "Issuances per identity, denials per reason, certificates valid now per root",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return o.with(func(ls []*audit.Ledger) error {
				now := time.Now()
				total := audit.Stats{At: now, Issued: map[string]int{}, Denied: map[string]int{}, ValidByRoot: map[string]int{}}
				for _, l := range ls {
					st, err := l.Stats(cmd.Context(), now)
					if err != nil {
						return err
					}
					for _, pair := range []struct{ to, from map[string]int }{{total.Issued, st.Issued}, {total.Denied, st.Denied}, {total.ValidByRoot, st.ValidByRoot}} {
						for k, v := range pair.from {
							pair.to[k] += v
						}
					}
				}
				w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
				section := func(title string, m map[string]int) {
					fmt.Fprintf(w, "%s\n", title)
					if len(m) == 0 {
						fmt.Fprintf(w, "  (none)\n")
					}
					for _, k := range slices.Sorted(maps.Keys(m)) {
						fmt.Fprintf(w, "  %s\t%d\n", k, m[k])
					}
				}
				section("issued, per SPIFFE ID", total.Issued)
				section("denied, per reason", total.Denied)
				section("valid now ("+now.UTC().Format(time.RFC3339)+"), per root fingerprint", total.ValidByRoot)
				return w.Flush()
			})
		},
	}
	o.bind(cmd.Flags())
	return cmd
}
