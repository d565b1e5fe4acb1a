package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshca/meshca/internal/admin"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/internal/rotation"
)

// adminOptions shape the admin API and root rotation of `server` and `dev`.
type adminOptions struct {
	socket   string
	addr     string
	schedule rotation.Schedule
	minAcked float64
}

func (o *adminOptions) bind(fs *pflag.FlagSet, remote bool) {
	fs.StringVar(&o.socket, "admin-socket", "", "Unix socket of the admin API (default <data-dir>/admin/admin.sock; the socket is 0600 in a 0700 directory)")
	if remote {
		fs.StringVar(&o.addr, "admin-addr", "", "also serve the admin API over TLS on this address, authorising callers' Kubernetes tokens with TokenReview and SubjectAccessReview (verbs on meshca.io resources)")
	}
	fs.BoolVar(&o.schedule.Enabled, "root-rotation-schedule", false, "rotate the root automatically: prepare at --root-prepare-at and activate at --root-activate-at of its lifetime, each gated on the proxies' ACKs, retire once nothing live is left under the old root")
	fs.Float64Var(&o.schedule.PrepareAt, "root-prepare-at", 0.5, "with --root-rotation-schedule: share of the root's lifetime at which its successor is prepared")
	fs.Float64Var(&o.schedule.ActivateAt, "root-activate-at", 5.0/6, "with --root-rotation-schedule: share of the root's lifetime at which the successor is activated, once the proxies allow")
	fs.Float64Var(&o.minAcked, "root-min-acked", 1, "share of proxies that must have ACKed a new root before it is activated")
}

// ledgerHoldings lists the certificates the audit ledger knows are valid at
// a time: what root retirement waits on.
func ledgerHoldings(l *audit.Ledger) rotation.LedgerFunc {
	return func(ctx context.Context, at time.Time) ([]rotation.Holding, error) {
		var out []rotation.Holding
		for r, err := range l.Query(ctx, audit.Filter{ValidAt: at, Kinds: []audit.Kind{audit.KindIssued}}) {
			if err != nil {
				return nil, err
			}
			out = append(out, rotation.Holding{SPIFFEID: r.SPIFFEID, RootFingerprint: r.RootFingerprint, NotAfter: r.NotAfter})
		}
		return out, nil
	}
}

// adminListeners opens what the admin API serves on.
func (s *stack) adminListeners(o adminOptions) ([]net.Listener, error) {
	var ls []net.Listener
	if o.socket != "" {
		l, err := s.admin.ListenUnix(o.socket)
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
	}
	if o.addr != "" {
		l, err := tls.Listen("tcp", o.addr, s.server.TLSConfig())
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, fmt.Errorf("--admin-addr: %w", err)
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// adminClientOptions are how admin commands reach the server.
type adminClientOptions struct {
	socket     string
	server     string
	caBundle   string
	serverName string
	tokenFile  string
	kubeconfig string
	asJSON     bool
}

func (o *adminClientOptions) bind(fs *pflag.FlagSet) {
	fs.StringVar(&o.socket, "admin-socket", filepath.Join(".meshca-dev", "admin", "admin.sock"), "Unix socket of the admin API (meshca dev's by default)")
	fs.StringVar(&o.server, "server", "", "https URL of a server's admin API (--admin-addr) instead of the socket")
	fs.StringVar(&o.caBundle, "ca-bundle", "", "with --server: PEM trust bundle that authenticates the server")
	fs.StringVar(&o.serverName, "server-name", "", "with --server: name expected in the server's certificate (default: the URL's host)")
	fs.StringVar(&o.tokenFile, "token-file", "", "with --server: file holding your Kubernetes bearer token")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "with --server: take the bearer token from this kubeconfig's current user")
	fs.BoolVar(&o.asJSON, "json", false, "print JSON")
}

func (o *adminClientOptions) client() (*admin.Client, error) {
	if o.server == "" {
		if _, err := os.Stat(o.socket); err != nil {
			return nil, fmt.Errorf("admin socket %s: %w (is meshca running? pass --admin-socket or --server)", o.socket, err)
		}
		return admin.NewUnixClient(o.socket), nil
	}
	if o.caBundle == "" {
		return nil, fmt.Errorf("--server needs --ca-bundle")
	}
	roots, err := caclient.LoadBundle(o.caBundle)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	var token func() (string, error)
	switch {
	case o.tokenFile != "":
		// Read on every call: projected tokens are rotated on disk.
		token = func() (string, error) {
			b, err := os.ReadFile(o.tokenFile)
			return strings.TrimSpace(string(b)), err
		}
	case o.kubeconfig != "":
		rc, err := clientcmd.BuildConfigFromFlags("", o.kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("--kubeconfig: %w", err)
		}
		switch {
		case rc.BearerToken != "":
			tok := rc.BearerToken
			token = func() (string, error) { return tok, nil }
		case rc.BearerTokenFile != "":
			path := rc.BearerTokenFile
			token = func() (string, error) {
				b, err := os.ReadFile(path)
				return strings.TrimSpace(string(b)), err
			}
		default:
			return nil, fmt.Errorf("--kubeconfig %s: its current user has no bearer token; use --token-file (e.g. from `kubectl create token`)", o.kubeconfig)
		}
	default:
		return nil, fmt.Errorf("--server needs --token-file or --kubeconfig")
	}
	return admin.NewRemoteClient(o.server, pool, o.serverName, token)
}

// shortFP abbreviates a fingerprint for tables.
func shortFP(fp string) string {
	if len(fp) > 16 {
		return fp[:16] + "…"
	}
	return fp
}
