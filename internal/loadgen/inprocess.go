package loadgen

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/devtoken"
	"github.com/meshca/meshca/internal/audit"
	"github.com/meshca/meshca/internal/certservice"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/keystore/memory"
)

// TrustDomain is the trust domain of in-process servers.
var TrustDomain = spiffeid.RequireTrustDomainFromString("cluster.local")

// Identity of the workload the load generator poses as on in-process
// servers and in the in-process reference measurements.
const (
	WorkloadNamespace      = "bench"
	WorkloadServiceAccount = "loadgen"
)

// stack is the part of a meshca server that does the work per request: a
// self-managed P-256 CA (on an in-memory keystore unless given one) and the
// development token authenticator, wired as cmd/meshca wires them, metrics
// included.
type stack struct {
	authority *ca.Authority
	tokens    *devtoken.Authority
	registry  *prometheus.Registry
	dir       string // holds the CA journal; removed by close
}

func newStack(ctx context.Context, keys ca.KeyStore, perReplica bool) (_ *stack, err error) {
	// The self-managed CA records its state in a journal file even when its
	// keys are in memory; a private temporary directory keeps it away from
	// anything real.
	dir, err := os.MkdirTemp("", "meshca-loadgen-*")
	if err != nil {
		return nil, fmt.Errorf("loadgen: %w", err)
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(dir)
		}
	}()
	discard := slog.New(slog.DiscardHandler)
	if keys == nil {
		keys = memory.New()
	}
	src, err := ca.NewSelfManaged(ca.SelfManagedConfig{
		TrustDomain:             TrustDomain,
		Keys:                    keys,
		JournalPath:             filepath.Join(dir, "ca-journal.json"),
		PerReplicaIntermediates: perReplica,
		Logger:                  discard,
	})
	if err != nil {
		return nil, fmt.Errorf("loadgen: %w", err)
	}
	reg := prometheus.NewRegistry()
	authority, err := ca.New(ca.Config{TrustDomain: TrustDomain, Source: src, Logger: discard, Metrics: reg})
	if err != nil {
		return nil, fmt.Errorf("loadgen: %w", err)
	}
	if err := authority.Init(ctx); err != nil {
		return nil, fmt.Errorf("loadgen: %w", err)
	}
	// No key file: an ephemeral token key that only this process knows.
	tokens, err := devtoken.New(devtoken.Config{TrustDomain: TrustDomain, Logger: discard})
	if err != nil {
		return nil, fmt.Errorf("loadgen: %w", err)
	}
	return &stack{authority: authority, tokens: tokens, registry: reg, dir: dir}, nil
}

// mintToken returns a token for the load generator's workload, valid for
// ttl plus a margin for the reference measurements and the warm-up.
func (s *stack) mintToken(ttl time.Duration) (string, error) {
	tok, err := s.tokens.Mint(devtoken.MintRequest{
		Namespace:      WorkloadNamespace,
		ServiceAccount: WorkloadServiceAccount,
		TTL:            ttl + 10*time.Minute,
	})
	if err != nil {
		return "", fmt.Errorf("loadgen: %w", err)
	}
	return tok, nil
}

func (s *stack) close() error {
	if err := os.RemoveAll(s.dir); err != nil {
		return fmt.Errorf("loadgen: %w", err)
	}
	return nil
}

// Server is a complete meshca server on 127.0.0.1: the gRPC CA API over TLS
// with a serving certificate from its own CA, in front of a stack. It lets
// one command or benchmark measure everything without prior setup.
//
// Per-request logging goes to a discard handler: writing a log line per
// certificate to a terminal would measure the terminal.
type Server struct {
	stack  *stack
	server *server.Server
	ledger *audit.Ledger // nil without ServerOptions.Audit
	cancel context.CancelFunc
	done   chan error
}

// ServerOptions shape an in-process Server.
type ServerOptions struct {
	// Audit records every issuance in an audit ledger, synced before the
	// certificate is returned, as meshca server does, in the stack's
	// temporary directory.
	Audit bool
	// AuditCommitDelay is the ledger's audit.Config.CommitDelay.
	AuditCommitDelay time.Duration
	// Keys holds the CA's keys; nil is an in-memory keystore.
	Keys ca.KeyStore
	// PerReplicaIntermediates is the CA's SelfManagedConfig option.
	PerReplicaIntermediates bool
}

// StartServer starts a Server listening on 127.0.0.1 (ports picked by the
// kernel). Close stops it. The CA's maintenance loop is not run: its
// intermediate lives 48h, far longer than any benchmark.
func StartServer(ctx context.Context, opts ServerOptions) (_ *Server, err error) {
	st, err := newStack(ctx, opts.Keys, opts.PerReplicaIntermediates)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = st.close()
		}
	}()
	var ledger *audit.Ledger
	cfg := certservice.Config{Authenticator: st.tokens, Issuer: st.authority, Metrics: st.registry}
	if opts.Audit {
		if ledger, err = audit.New(audit.Config{Dir: filepath.Join(st.dir, "audit"), CommitDelay: opts.AuditCommitDelay, Metrics: st.registry}); err != nil {
			return nil, fmt.Errorf("loadgen: %w", err)
		}
		cfg.Ledger = ledger
	}
	svc, err := certservice.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("loadgen: %w", err)
	}
	serverID, err := identity.WorkloadID(TrustDomain, "meshca-system", "meshca")
	if err != nil {
		return nil, fmt.Errorf("loadgen: %w", err)
	}
	srv, err := server.New(server.Config{
		GRPCAddr:       "127.0.0.1:0",
		MonitorAddr:    "127.0.0.1:0",
		CA:             st.authority,
		ServerID:       serverID,
		DNSNames:       []string{"localhost"},
		IPs:            []net.IP{net.IPv4(127, 0, 0, 1)},
		Services:       []server.Service{svc},
		MaxRecvMsgSize: certservice.MaxRequestBytes,
		Gatherer:       st.registry,
	})
	if err != nil {
		return nil, fmt.Errorf("loadgen: %w", err)
	}
	if err := srv.Listen(); err != nil {
		return nil, fmt.Errorf("loadgen: %w", err)
	}
	// The server outlives a cancelled ctx until Close, so callers can still
	// drain their clients in order.
	serveCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan error, 2)
	go func() { done <- srv.Serve(serveCtx) }()
	if ledger != nil {
		go func() { done <- ledger.Run(serveCtx) }()
	}
	return &Server{stack: st, server: srv, ledger: ledger, cancel: cancel, done: done}, nil
}

// Addr is the gRPC address, host:port.
func (s *Server) Addr() string { return s.server.GRPCAddr() }

// TrustBundle is the root(s) that authenticate the server and its chains.
func (s *Server) TrustBundle() []*x509.Certificate { return s.stack.authority.Issuer().Roots }

// Authority is the server's CA.
func (s *Server) Authority() *ca.Authority { return s.stack.authority }

// MintToken returns a token the server accepts, for the workload
// WorkloadNamespace/WorkloadServiceAccount, valid for at least ttl.
func (s *Server) MintToken(ttl time.Duration) (string, error) { return s.stack.mintToken(ttl) }

// ledgerBatches reads the ledger's group-commit counters from the server's
// metrics: batches written (one fsync each) and the records in them.
func (s *Server) ledgerBatches() (batches, records uint64) {
	if s.ledger == nil {
		return 0, 0
	}
	mfs, err := s.stack.registry.Gather()
	if err != nil {
		return 0, 0
	}
	for _, mf := range mfs {
		if mf.GetName() != "meshca_audit_batch_records" {
			continue
		}
		for _, m := range mf.GetMetric() {
			h := m.GetHistogram()
			batches += h.GetSampleCount()
			records += uint64(h.GetSampleSum())
		}
	}
	return batches, records
}

// Close stops the server, waiting for in-flight requests (close clients
// first, or wait up to the server's drain timeout), and removes its state.
func (s *Server) Close() error {
	s.cancel()
	err := <-s.done
	if s.ledger != nil {
		err = errors.Join(err, <-s.done, s.ledger.Close())
	}
	return errors.Join(err, s.stack.close())
}
