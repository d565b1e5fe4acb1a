package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/keystore"
)

type certOptions struct {
	addr       string
	bundle     string
	serverName string
	token      string
	tokenFile  string
	clusterID  string
	keyType    string
	ttl        time.Duration
	out        string
	timeout    time.Duration
}

func newCertCommand(_ *globalOptions) *cobra.Command {
	o := &certOptions{}
	cmd := &cobra.Command{
		Use:   "cert",
		Short: "Request a workload certificate: generate a key locally, send a CSR with a token, write key, chain and bundle",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			token, err := o.readToken()
			if err != nil {
				return err
			}
			kt, err := keystore.ParseKeyType(o.keyType)
			if err != nil {
				return fmt.Errorf("--key-type: %w", err)
			}
			bundle, err := caclient.LoadBundle(o.bundle)
			if err != nil {
				return fmt.Errorf("--ca-bundle: %w", err)
			}
			c, err := caclient.New(caclient.Config{Address: o.addr, TrustBundle: bundle, ServerName: o.serverName,
				ClusterID: o.clusterID, Timeout: o.timeout})
			if err != nil {
				return err
			}
			defer c.Close()
			creds, err := c.Fetch(cmd.Context(), caclient.Request{Token: token, KeyType: kt, TTL: o.ttl})
			if err != nil {
				return err
			}
			if err := creds.Write(o.out); err != nil {
				return err
			}
			leaf := creds.Chain[0]
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "SPIFFE ID   %s\n", creds.ID)
			fmt.Fprintf(w, "serial      %s\n", leaf.SerialNumber.Text(16))
			fmt.Fprintf(w, "valid       %s .. %s (%s)\n", leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339),
				time.Until(leaf.NotAfter).Round(time.Second))
			fmt.Fprintf(w, "wrote       %s/{key.pem,cert-chain.pem,root-cert.pem}\n", o.out)
			return nil
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&o.addr, "addr", "127.0.0.1:15012", "address of the meshca CA API")
	fs.StringVar(&o.bundle, "ca-bundle", ".meshca-dev/root-cert.pem", "PEM trust bundle used to verify the server and the issued chain")
	fs.StringVar(&o.serverName, "server-name", "", "expected name in the server's certificate (default: the host of --addr)")
	fs.StringVar(&o.token, "token", "", "service-account token (prefer --token-file: flags show up in process listings)")
	fs.StringVar(&o.tokenFile, "token-file", "", "file holding the service-account token")
	fs.StringVar(&o.clusterID, "cluster-id", "", "cluster that issued the token (multi-cluster meshes)")
	fs.StringVar(&o.keyType, "key-type", string(keystore.ECDSAP256), "key type: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096")
	fs.DurationVar(&o.ttl, "ttl", 0, "requested lifetime (0: the server's default)")
	fs.StringVar(&o.out, "out", "meshca-certs", "directory to write key.pem, cert-chain.pem and root-cert.pem into")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Second, "timeout of the request")
	return cmd
}

func (o *certOptions) readToken() (string, error) {
	switch {
	case o.token != "" && o.tokenFile != "":
		return "", fmt.Errorf("give --token or --token-file, not both")
	case o.token != "":
		return o.token, nil
	case o.tokenFile != "":
		b, err := os.ReadFile(o.tokenFile)
		if err != nil {
			return "", fmt.Errorf("--token-file: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	default:
		return "", fmt.Errorf("a token is required: --token-file (or --token)")
	}
}
