package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

func newSDSCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "sds",
		Short: "Talk to an SDS server as Envoy does",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newSDSWatchCommand())
	return cmd
}

type sdsWatchOptions struct {
	socket  string
	node    string
	delta   bool
	once    bool
	timeout time.Duration
}

func newSDSWatchCommand() *cobra.Command {
	o := &sdsWatchOptions{}
	cmd := &cobra.Command{
		Use:   "watch",
		Short: "Subscribe to default and ROOTCA on an SDS socket and print every version received",
		Long: `Connect to an SDS server on a Unix socket (a node agent's, such as the one
"meshca dev" runs) with an Envoy-like client, subscribe to "default" and
"ROOTCA", and print every response: the SPIFFE ID, serial and expiry of the
certificate, the fingerprints of the roots, and the ACK or NACK sent back.
The client checks what it receives as Envoy would (the key must match the
certificate, the bundle must hold certificates) and NACKs what fails.`,
		Example: `  meshca sds watch --socket .meshca-dev/sds/agent.sock --once`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return o.run(cmd.Context(), cmd.OutOrStdout())
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&o.socket, "socket", "", "Unix socket of the SDS server (required)")
	fs.StringVar(&o.node, "node", "meshca-sds-watch", "Envoy node ID to present")
	fs.BoolVar(&o.delta, "delta", false, "use incremental xDS (DeltaSecrets) instead of state of the world")
	fs.BoolVar(&o.once, "once", false, "exit once both secrets are held")
	fs.DurationVar(&o.timeout, "timeout", time.Minute, "with --once: give up when both secrets are not held after this long")
	_ = cmd.MarkFlagRequired("socket")
	return cmd
}

func (o *sdsWatchOptions) run(ctx context.Context, w io.Writer) error {
	path, err := filepath.Abs(o.socket)
	if err != nil {
		return fmt.Errorf("sds watch: --socket: %w", err)
	}
	if o.once && o.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.timeout)
		defer cancel()
	}
	// Waiting for the socket lets the watch start before the server does.
	conn, err := grpc.NewClient("unix://"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{
			BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second}}))
	if err != nil {
		return fmt.Errorf("sds watch: %w", err)
	}
	defer conn.Close()
	c := sdstest.New(sdstest.Config{Conn: conn, Node: o.node, Delta: o.delta})
	if err := c.Connect(ctx); err != nil {
		return o.ended(ctx, err)
	}
	defer c.Disconnect()
	fmt.Fprintf(w, "watching %s (node %q, %s)\n", path, o.node, protocolName(o.delta))

	printed, acked := 0, "" // acked: the version_info a state-of-the-world NACK repeats
	for {
		st, err := c.Wait(ctx, func(s sdstest.State) bool { return len(s.Responses) > printed || !s.Connected })
		if err != nil {
			return o.ended(ctx, err)
		}
		for _, r := range st.Responses[printed:] {
			printSDSResponse(w, r, o.delta, acked)
			if r.NACK == "" {
				acked = r.Version
			}
		}
		printed = len(st.Responses)
		if o.once && st.Has(sds.CertName, sds.RootsName) {
			return nil
		}
		if !st.Connected {
			return fmt.Errorf("sds watch: the server ended the stream: %w", st.Err)
		}
	}
}

// ended says what an interrupted watch means: the end of a watch without
// --once, a failure with it.
func (o *sdsWatchOptions) ended(ctx context.Context, err error) error {
	if !o.once && errors.Is(ctx.Err(), context.Canceled) {
		return nil
	}
	if o.once && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("sds watch: no complete set of secrets within %s: %w", o.timeout, err)
	}
	return fmt.Errorf("sds watch: %w", err)
}

func protocolName(delta bool) string {
	if delta {
		return "delta xDS"
	}
	return "state of the world"
}

// printSDSResponse prints one response and the answer the client sent.
// ackedVersion is the version_info of the last ACK, which a state-of-the-world
// NACK repeats.
func printSDSResponse(w io.Writer, r sdstest.Response, delta bool, ackedVersion string) {
	fmt.Fprintf(w, "\nresponse  nonce %s, version %q\n", r.Nonce, r.Version)
	for i, sec := range r.Secrets {
		version := ""
		if delta && i < len(r.Versions) {
			version = "  (version " + r.Versions[i] + ")"
		}
		switch {
		case sec.GetTlsCertificate() != nil:
			fmt.Fprintf(w, "  %-8s %s%s\n", sec.GetName(), describeCert(sec.GetTlsCertificate()), version)
		case sec.GetValidationContext() != nil:
			roots, err := ca.ParseCerts(sec.GetValidationContext().GetTrustedCa().GetInlineBytes())
			if err != nil {
				fmt.Fprintf(w, "  %-8s unreadable trust bundle: %v%s\n", sec.GetName(), err, version)
				continue
			}
			fmt.Fprintf(w, "  %-8s %d root(s)%s\n", sec.GetName(), len(roots), version)
			for _, root := range roots {
				fmt.Fprintf(w, "           root %s  expires %s\n", ca.Fingerprint(root), root.NotAfter.UTC().Format(time.RFC3339))
			}
		default:
			fmt.Fprintf(w, "  %-8s (neither a certificate nor a trust bundle)%s\n", sec.GetName(), version)
		}
	}
	for _, name := range r.Removed {
		fmt.Fprintf(w, "  %-8s removed\n", name)
	}
	switch {
	case r.NACK != "" && delta:
		fmt.Fprintf(w, "  sent     NACK (nonce %s): %s\n", r.Nonce, r.NACK)
	case r.NACK != "":
		fmt.Fprintf(w, "  sent     NACK (nonce %s, version_info %q): %s\n", r.Nonce, ackedVersion, r.NACK)
	case delta:
		fmt.Fprintf(w, "  sent     ACK (nonce %s)\n", r.Nonce)
	default:
		fmt.Fprintf(w, "  sent     ACK (nonce %s, version_info %q)\n", r.Nonce, r.Version)
	}
}

func describeCert(tc *tlsv3.TlsCertificate) string {
	svid, err := x509svid.Parse(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
	if err != nil {
		return "unreadable certificate: " + err.Error()
	}
	leaf := svid.Certificates[0]
	return fmt.Sprintf("%s\n           serial %s  expires %s (in %s)  chain of %d",
		svid.ID, leaf.SerialNumber.Text(16), leaf.NotAfter.UTC().Format(time.RFC3339),
		time.Until(leaf.NotAfter).Round(time.Second), len(svid.Certificates))
}
