package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/policy"
)

func newMTLSCommand() *cobra.Command {
	o := &adminClientOptions{}
	cmd := &cobra.Command{
		Use:   "mtls",
		Short: "Show and change the mesh-wide mTLS policy: status, enable, disable, exclude, plan, render",
		Long: `Show and change the mesh-wide mTLS policy that meshca serves: whether mutual
TLS is on, in which mode (STRICT: mTLS only; PERMISSIVE: mTLS and plaintext),
and which services are excluded from it (exact FQDNs, or "*.<suffix>").

The policy is kept in a ConfigMap (meshca server in a cluster) or a file
(meshca dev, or --mtls-policy-file); edits made there by hand are picked up
too. Every change is validated whole before anything is stored, merged with
concurrent changes rather than overwriting them, and written to the audit
ledger.

Before turning STRICT on, "meshca mtls plan" lists the services it would cut
off: those with endpoints that have no proxy to terminate mTLS.`,
	}
	o.bind(cmd.PersistentFlags())
	cmd.AddCommand(newMTLSStatusCommand(o), newMTLSEnableCommand(o), newMTLSDisableCommand(o),
		newMTLSExcludeCommand(o), newMTLSPlanCommand(o), newMTLSRenderCommand(o))
	return cmd
}

func newMTLSStatusCommand(o *adminClientOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "The policy in force, where it is stored, and whether the stored version was read",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return callAdmin(cmd, o, http.MethodGet, "/v1/mtls", nil, printMTLSStatus)
		},
	}
}

func newMTLSEnableCommand(o *adminClientOptions) *cobra.Command {
	var req admin.MTLSEnableRequest
	cmd := &cobra.Command{
		Use:   "enable",
		Short: "Turn mTLS on (see what STRICT would cut off with `meshca mtls plan` first)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return callAdmin(cmd, o, http.MethodPost, "/v1/mtls/enable", req, printMTLSChange)
		},
	}
	cmd.Flags().StringVar((*string)(&req.Mode), "mode", "", "strict (mTLS only) or permissive (mTLS and plaintext); default: the stored mode, strict unless set")
	return cmd
}

func newMTLSDisableCommand(o *adminClientOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "disable",
		Short: "Turn mTLS off (the mode and exclusions are kept for the next enable)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return callAdmin(cmd, o, http.MethodPost, "/v1/mtls/disable", nil, printMTLSChange)
		},
	}
}

func newMTLSExcludeCommand(o *adminClientOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "exclude",
		Short: "Add services to, or remove them from, the services excluded from mTLS",
	}
	for _, verb := range []string{"add", "remove"} {
		short := "Exclude services from mTLS: they keep accepting plaintext, and clients send them plaintext"
		if verb == "remove" {
			short = "Stop excluding services: they follow the mesh-wide mode again"
		}
		cmd.AddCommand(&cobra.Command{
			Use:   verb + " FQDN...",
			Short: short,
			Long: short + `.

Names are service FQDNs (web.shop.svc.cluster.local) or patterns
(*.legacy.svc.cluster.local: every service of namespace legacy). All names are
checked first: one invalid name, or one that is not excluded when removing,
changes nothing.`,
			Args: cobra.MinimumNArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return callAdmin(cmd, o, http.MethodPost, "/v1/mtls/exclusions/"+verb, admin.MTLSNamesRequest{Names: args}, printMTLSChange)
			},
		})
	}
	return cmd
}

func newMTLSPlanCommand(o *adminClientOptions) *cobra.Command {
	var exclude []string
	cmd := &cobra.Command{
		Use:   "plan",
		Short: "List the services that STRICT mTLS would cut off: endpoints without a proxy",
		Long: `List the services that mTLS in STRICT mode, with the current exclusions (and
those given with --exclude), would cut off: services that would accept mTLS
only, but have endpoints with no proxy to terminate it. Nothing is changed.

The services and their endpoints come from the cluster's API server (meshca
server, or meshca dev with --kubeconfig). A proxy is found by its SDS stream
to the server: see the note the plan ends with for what that cannot see.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return callAdmin(cmd, o, http.MethodGet, "/v1/mtls/plan"+admin.PlanQuery(exclude), nil, printMTLSPlan)
		},
	}
	cmd.Flags().StringSliceVar(&exclude, "exclude", nil, "plan as if these names were excluded too (nothing is stored)")
	return cmd
}

func newMTLSRenderCommand(o *adminClientOptions) *cobra.Command {
	var rootNamespace, clusterDomain string
	var sidecars []string
	cmd := &cobra.Command{
		Use:   "render",
		Short: "Print the policy as Istio PeerAuthentication and DestinationRule YAML",
		Long: `Print the policy as Istio configuration, for clusters whose proxies Istio's
control plane programs: a mesh-wide PeerAuthentication in Istio's root
namespace and, while mTLS is on, a DestinationRule sending plaintext to each
excluded name. Apply it with

  meshca mtls render | kubectl apply --prune -l app.kubernetes.io/managed-by=meshca -f -

An excluded service whose pods run sidecars must also be told to accept
plaintext: name it with --sidecar NAME=KEY=VALUE,... (the labels of its pods),
or --sidecar '*.<namespace>.svc.<domain>' for every pod of an excluded
namespace.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			q := admin.RenderQuery(rootNamespace, clusterDomain, sidecars)
			return callAdmin(cmd, o, http.MethodGet, "/v1/mtls/render"+q, nil, func(w io.Writer, r admin.MTLSRender) error {
				_, err := io.WriteString(w, r.YAML)
				return err
			})
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&rootNamespace, "root-namespace", "", "Istio's root namespace (default istio-system)")
	fs.StringVar(&clusterDomain, "cluster-domain", "", "the cluster's DNS domain (default: the server's --cluster-domain)")
	fs.StringArrayVar(&sidecars, "sidecar", nil, "an excluded name whose pods run sidecars, as NAME=KEY=VALUE,... (its pods' labels) or a namespace pattern NAME (repeatable)")
	return cmd
}

// callAdmin sends one request to the admin API and prints its answer, a
// T: as JSON with --json, else with text.
func callAdmin[T any](cmd *cobra.Command, o *adminClientOptions, method, path string, body any, text func(io.Writer, T) error) error {
	c, err := o.client()
	if err != nil {
		return err
	}
	var out T
	if err := c.Do(cmd.Context(), method, path, body, &out); err != nil {
		return err
	}
	if o.asJSON {
		return printJSON(cmd.OutOrStdout(), out)
	}
	return text(cmd.OutOrStdout(), out)
}

// printJSON writes v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// mtlsState says in a few words what a policy enforces.
func mtlsState(p policy.Policy) string {
	if !p.Enabled {
		return "off"
	}
	return "on, " + string(p.EffectiveMode())
}

func mtlsMeaning(p policy.Policy) string {
	switch {
	case !p.Enabled:
		return fmt.Sprintf("nothing requires mTLS; enabling it would be %s", p.EffectiveMode())
	case p.EffectiveMode() == policy.ModePermissive:
		return "services accept mTLS and plaintext"
	default:
		return "services that are not excluded accept mTLS only"
	}
}

// printPolicy writes the rows shared by status and changes.
func printPolicy(tw io.Writer, p policy.Policy) {
	fmt.Fprintf(tw, "mTLS\t%s (%s)\n", mtlsState(p), mtlsMeaning(p))
	if len(p.Excluded) == 0 {
		fmt.Fprintf(tw, "excluded\tnone\n")
	}
	for i, e := range p.Excluded {
		label := ""
		if i == 0 {
			label = "excluded"
		}
		fmt.Fprintf(tw, "%s\t%s\n", label, e)
	}
}

func printMTLSStatus(w io.Writer, st admin.MTLSStatus) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	printPolicy(tw, st.Policy)
	store := st.Store
	switch {
	case !st.Synced:
		store += ", not read yet: the policy shown is the default, not what is stored"
	case st.Revision == "":
		store += ", nothing stored yet: the default policy applies"
	default:
		store += ", revision " + string(st.Revision)
	}
	fmt.Fprintf(tw, "store\t%s\n", store)
	if st.Error != "" {
		fmt.Fprintf(tw, "WARNING\tthe newest stored version (revision %s) is not in force, the policy above is the last good one: %s\n",
			st.ErrorRevision, st.Error)
	}
	return tw.Flush()
}

func printMTLSChange(w io.Writer, ch admin.MTLSChange) error {
	if !ch.Changed {
		fmt.Fprintln(w, "Nothing changed: the policy already said so.")
	} else {
		if b, a := mtlsState(ch.Before), mtlsState(ch.After); b != a {
			fmt.Fprintf(w, "mTLS is now %s (was %s).\n", a, b)
		}
		if added := missingFrom(ch.After.Excluded, ch.Before.Excluded); len(added) > 0 {
			fmt.Fprintf(w, "Now excluded: %s.\n", strings.Join(added, ", "))
		}
		if removed := missingFrom(ch.Before.Excluded, ch.After.Excluded); len(removed) > 0 {
			fmt.Fprintf(w, "No longer excluded: %s.\n", strings.Join(removed, ", "))
		}
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	printPolicy(tw, ch.After)
	return tw.Flush()
}

// missingFrom returns the names of a that are not in b.
func missingFrom(a, b []string) []string {
	var out []string
	for _, n := range a {
		if !slices.Contains(b, n) {
			out = append(out, n)
		}
	}
	return out
}

func printMTLSPlan(w io.Writer, plan admin.MTLSPlan) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "plan\tmTLS on, %s, with %d excluded (today: %s)\n", plan.Proposed.EffectiveMode(), len(plan.Proposed.Excluded), mtlsState(plan.Current))
	if extra := missingFrom(plan.Proposed.Excluded, plan.Current.Excluded); len(extra) > 0 {
		fmt.Fprintf(tw, "\tas if also excluded: %s\n", strings.Join(extra, ", "))
	}
	fmt.Fprintf(tw, "looked at\t%d services, %d endpoints, %d proxies\n", plan.Services, plan.Endpoints, plan.Proxies)
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	if len(plan.Findings) == 0 {
		fmt.Fprintln(w, "Nothing would be cut off: every endpoint of every service that would accept mTLS only has a proxy.")
	} else {
		fmt.Fprintf(w, "%d service(s) would be cut off: clients would send them mTLS that endpoints without a proxy cannot terminate.\n\n", len(plan.Findings))
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "SERVICE\tWITHOUT PROXY\tENDPOINTS WITHOUT A PROXY")
		for _, f := range plan.Findings {
			n := fmt.Sprintf("%d of %d", len(f.Unproxied), f.Endpoints)
			if f.All() {
				n += " (all)"
			}
			eps := make([]string, len(f.Unproxied))
			for i, e := range f.Unproxied {
				eps[i] = e.String()
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Service, n, strings.Join(eps, ", "))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		fmt.Fprintln(w, "\nGive them proxies, or exclude them (`meshca mtls exclude add NAME`; preview with `meshca mtls plan --exclude NAME`).")
	}
	fmt.Fprintf(w, "\n%s\n", wrap("How proxies are found: "+plan.ProxyBasis+".", 80))
	return nil
}

// wrap breaks s into lines of at most width characters at spaces.
func wrap(s string, width int) string {
	var b strings.Builder
	n := 0
	for i, word := range strings.Fields(s) {
		switch {
		case i == 0:
		case n+1+len(word) > width:
			b.WriteByte('\n')
			n = 0
		default:
			b.WriteByte(' ')
			n++
		}
		b.WriteString(word)
		n += len(word)
	}
	return b.String()
}
