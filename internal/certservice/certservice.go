// Package certservice serves Istio's CA API,
// istio.v1.auth.IstioCertificateService/CreateCertificate, so Istio's own
// agents and ztunnel can use meshca unchanged. It is the edge: it
// authenticates the caller, asks the CA to sign, and turns typed errors into
// gRPC status codes. Callers see precise reasons for their own mistakes and
// opaque messages for meshca's; the log gets the detail.
package certservice

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/audit"
)

// MaxRequestBytes bounds a whole CreateCertificate message; the server
// should refuse anything larger before decoding it.
const MaxRequestBytes = 64 << 10

// impersonationKey is how ztunnel asks for another workload's identity.
const impersonationKey = "ImpersonatedIdentity"

// Issuer signs certificates for authenticated callers.
type Issuer interface {
	Issue(ctx context.Context, req ca.Request) (*ca.Issued, error)
}

// Recorder durably records issuances and denials; *audit.Ledger is one.
type Recorder interface {
	Append(ctx context.Context, rec audit.Record) (audit.Record, error)
}

// Config configures a Service.
type Config struct {
	Authenticator identity.Authenticator
	Issuer        Issuer
	// Ledger, when set, records every issuance before its certificate is
	// returned (a failure refuses the request: fail closed) and every
	// denial.
	Ledger  Recorder
	Logger  *slog.Logger
	Metrics prometheus.Registerer
}

// Service implements IstioCertificateServiceServer.
type Service struct {
	pb.UnimplementedIstioCertificateServiceServer
	auth    identity.Authenticator
	issuer  Issuer
	ledger  Recorder
	log     *slog.Logger
	metrics *metrics
}

// New returns a Service.
func New(cfg Config) (*Service, error) {
	if cfg.Authenticator == nil || cfg.Issuer == nil {
		return nil, fmt.Errorf("certservice: an authenticator and an issuer are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Service{auth: cfg.Authenticator, issuer: cfg.Issuer, ledger: cfg.Ledger, log: cfg.Logger, metrics: newMetrics(cfg.Metrics)}, nil
}

// Register adds the service to a gRPC server.
func (s *Service) Register(r grpc.ServiceRegistrar) { pb.RegisterIstioCertificateServiceServer(r, s) }

// CreateCertificate authenticates the caller and signs its CSR.
func (s *Service) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	began := time.Now()
	addr := peerAddr(ctx)
	log := s.log.With("peer", addr)
	caller, err := s.authenticate(ctx)
	if err != nil {
		return nil, s.deny(ctx, log, began, addr, identity.Caller{}, err)
	}
	log = log.With("spiffeID", caller.ID.String(), "tokenHash", caller.TokenHash)
	if caller.PodName != "" {
		log = log.With("pod", caller.Namespace+"/"+caller.PodName)
	}
	if req.GetMetadata().GetFields()[impersonationKey] != nil {
		return nil, s.deny(ctx, log, began, addr, caller, errImpersonation)
	}
	if req.GetValidityDuration() < 0 {
		return nil, s.deny(ctx, log, began, addr, caller, errNegativeTTL)
	}
	issued, err := s.issuer.Issue(ctx, ca.Request{
		CSR: []byte(req.GetCsr()),
		ID:  caller.ID,
		TTL: seconds(req.GetValidityDuration()),
	})
	if err != nil {
		return nil, s.deny(ctx, log, began, addr, caller, err)
	}
	leaf := issued.Leaf()
	if err := s.recordIssuance(ctx, addr, caller, issued); err != nil {
		return nil, s.deny(ctx, log.With("serial", leaf.SerialNumber.Text(16)), began, addr, caller, err)
	}
	chain := make([]string, 0, len(issued.Chain)+1)
	for _, c := range issued.Chain {
		chain = append(chain, string(ca.EncodeCerts(c)))
	}
	chain = append(chain, string(ca.EncodeCerts(issued.Root)))
	s.metrics.observe("issued", "", began)
	log.Info("issued certificate", "serial", leaf.SerialNumber.Text(16),
		"notAfter", leaf.NotAfter, "clamped", issued.Clamped)
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

// recordIssuance writes the issuance to the ledger and returns once it is
// on disk. The certificate is not returned without its record.
func (s *Service) recordIssuance(ctx context.Context, addr string, c identity.Caller, issued *ca.Issued) error {
	if s.ledger == nil {
		return nil
	}
	rec, err := audit.Issuance(issued.Chain, issued.Root)
	if err != nil {
		return fmt.Errorf("certservice: %w", err)
	}
	if _, err := s.ledger.Append(ctx, withCaller(rec, addr, c)); err != nil {
		return fmt.Errorf("certservice: %w: %w", errLedger, err)
	}
	return nil
}

// recordDenial writes a denial to the ledger. The caller is refused either
// way, so a ledger failure is only logged.
func (s *Service) recordDenial(ctx context.Context, log *slog.Logger, addr string, c identity.Caller, reason string, err error) {
	if s.ledger == nil {
		return
	}
	rec := withCaller(audit.Record{Kind: audit.KindDenied, Reason: reason, Detail: truncate(err.Error(), 512)}, addr, c)
	if !c.ID.IsZero() {
		rec.ClaimedID = c.ID.String()
	}
	// A caller that gave up still gets its denial recorded.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ledgerTimeout)
	defer cancel()
	if _, lerr := s.ledger.Append(rctx, rec); lerr != nil {
		log.Error("cannot record a denial in the audit ledger", "reason", reason, "err", lerr)
	}
}

// withCaller adds to r what the service knows of the caller, the same for
// issuances and denials.
func withCaller(r audit.Record, addr string, c identity.Caller) audit.Record {
	r.Namespace, r.ServiceAccount = c.Namespace, c.ServiceAccount
	r.PodName, r.PodUID, r.NodeName = c.PodName, c.PodUID, c.NodeName
	r.ClusterID, r.TokenHash, r.Peer = c.ClusterID, c.TokenHash, addr
	return r
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// seconds converts a requested lifetime without overflowing: an absurdly
// long request must be clamped to the maximum, not wrap around to the
// default.
func seconds(n int64) time.Duration {
	if n > int64(math.MaxInt64/time.Second) {
		return math.MaxInt64
	}
	return time.Duration(n) * time.Second
}

var (
	errImpersonation = errors.New("certservice: impersonation (ImpersonatedIdentity) is not supported")
	errNegativeTTL   = errors.New("certservice: validity_duration must not be negative")
	errLedger        = errors.New("certservice: the audit ledger cannot record the issuance")
)

// ledgerTimeout bounds the wait for a denial's record.
const ledgerTimeout = 5 * time.Second

func (s *Service) authenticate(ctx context.Context) (identity.Caller, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	cred, err := identity.CredentialFromMetadata(md.Get)
	if err != nil {
		return identity.Caller{}, err
	}
	return s.auth.Authenticate(ctx, cred)
}

// deny logs err with its detail, counts it, records it in the ledger, and
// returns the gRPC status the caller sees.
func (s *Service) deny(ctx context.Context, log *slog.Logger, began time.Time, addr string, c identity.Caller, err error) error {
	st, reason := toStatus(err)
	s.metrics.observe("denied", reason, began)
	level := slog.LevelWarn
	if st.Code() == codes.Internal || errors.Is(err, errLedger) {
		level = slog.LevelError
	}
	log.Log(context.Background(), level, "denied certificate request", "reason", reason, "code", st.Code().String(), "err", err)
	if !errors.Is(err, errLedger) {
		s.recordDenial(ctx, log, addr, c, reason, err)
	}
	return st.Err()
}

// toStatus is the single place where meshca's errors become gRPC codes.
func toStatus(err error) (*status.Status, string) {
	var idErr *identity.Error
	var csrErr *ca.CSRError
	switch {
	case errors.As(err, &idErr):
		if idErr.Reason == identity.ReasonUnavailable {
			return status.New(codes.Unavailable, "cannot verify the token right now; retry"), string(idErr.Reason)
		}
		return status.New(codes.Unauthenticated, "authentication failed: "+idErr.Error()), string(idErr.Reason)
	case errors.As(err, &csrErr):
		return status.New(codes.InvalidArgument, "invalid CSR: "+csrErr.Detail), string(csrErr.Problem)
	case errors.Is(err, errImpersonation):
		return status.New(codes.PermissionDenied, "impersonation (ImpersonatedIdentity) is not supported"), "impersonation"
	case errors.Is(err, errNegativeTTL):
		return status.New(codes.InvalidArgument, "validity_duration must not be negative"), "bad-ttl"
	case errors.Is(err, ca.ErrForeignTrustDomain):
		return status.New(codes.PermissionDenied, "identity is outside this CA's trust domain"), "foreign-trust-domain"
	case errors.Is(err, errLedger):
		return status.New(codes.Unavailable, "the audit ledger is unavailable, so no certificate was issued; retry"), "ledger-unavailable"
	case errors.Is(err, ca.ErrNotReady):
		return status.New(codes.Unavailable, "CA is not ready; retry"), "ca-not-ready"
	case errors.Is(err, context.Canceled):
		return status.New(codes.Canceled, "request cancelled"), "cancelled"
	case errors.Is(err, context.DeadlineExceeded):
		return status.New(codes.DeadlineExceeded, "deadline exceeded"), "deadline"
	default:
		return status.New(codes.Internal, "internal error; see the CA's log"), "internal"
	}
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}
