package sds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/identity"
)

// Config configures a Server.
type Config struct {
	// Source supplies each proxy's secrets. Required.
	Source Source
	// Authenticate identifies the proxy behind a stream from its context
	// (metadata, TLS peer). Nil accepts everyone with a zero Peer.ID, for a
	// Unix socket only the local proxy can reach; see BearerAuthenticator.
	Authenticate func(ctx context.Context) (Peer, error)
	Clock        clockwork.Clock
	Logger       *slog.Logger
	Metrics      prometheus.Registerer
}

// Server is an Envoy Secret Discovery Service (v3) server. It never signs:
// it serves what its Source hands it and keeps account of what each
// connected proxy has ACKed.
type Server struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer

	src     Source
	auth    func(ctx context.Context) (Peer, error)
	clock   clockwork.Clock
	log     *slog.Logger
	metrics *metrics
	enc     encoder
	pusher  *pusher
	nonces  atomic.Uint64

	// mu guards the accounting below. Lock order: stream.mu, then mu.
	mu             sync.Mutex
	streams        map[*stream]struct{}
	rootAcks       map[string]int // root fingerprint → streams whose ACKed ROOTCA holds it
	rootWatchers   int            // streams subscribed to ROOTCA
	policyAcks     map[string]int // policy version → streams that ACKed it
	policyWatchers int            // streams subscribed to the policy
	// ackChanged is closed at the next change of the accounting; nil until
	// someone asks for it, so ACKs cost nothing extra when nobody waits.
	ackChanged chan struct{}
}

// New validates cfg. It starts nothing: streams are served by the gRPC
// server the Server is registered with.
func New(cfg Config) (*Server, error) {
	if cfg.Source == nil {
		return nil, fmt.Errorf("sds: a source is required")
	}
	if cfg.Authenticate == nil {
		cfg.Authenticate = func(context.Context) (Peer, error) { return Peer{}, nil }
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		src:        cfg.Source,
		auth:       cfg.Authenticate,
		clock:      cfg.Clock,
		log:        cfg.Logger,
		pusher:     newPusher(),
		streams:    make(map[*stream]struct{}),
		rootAcks:   make(map[string]int),
		policyAcks: make(map[string]int),
	}
	s.metrics = newMetrics(cfg.Metrics, s)
	return s, nil
}

// Register adds the service to a gRPC server.
func (s *Server) Register(r grpc.ServiceRegistrar) {
	secretv3.RegisterSecretDiscoveryServiceServer(r, s)
}

// StreamSecrets serves a state-of-the-world stream.
func (s *Server) StreamSecrets(gs secretv3.SecretDiscoveryService_StreamSecretsServer) error {
	st, err := s.open(gs.Context(), sotw)
	if err != nil {
		return s.refuse(gs.Context(), Peer{}, err)
	}
	defer st.close()
	st.sendSotw = gs.Send
	for {
		req, err := gs.Recv()
		if err != nil {
			return endOfStream(err)
		}
		if err := st.handleSotw(req); err != nil {
			return s.refuse(gs.Context(), st.peerCopy(), err)
		}
	}
}

// DeltaSecrets serves an incremental stream.
func (s *Server) DeltaSecrets(gs secretv3.SecretDiscoveryService_DeltaSecretsServer) error {
	st, err := s.open(gs.Context(), delta)
	if err != nil {
		return s.refuse(gs.Context(), Peer{}, err)
	}
	defer st.close()
	st.sendDelta = gs.Send
	for {
		req, err := gs.Recv()
		if err != nil {
			return endOfStream(err)
		}
		if err := st.handleDelta(req); err != nil {
			return s.refuse(gs.Context(), st.peerCopy(), err)
		}
	}
}

// FetchSecrets answers one request with the current secrets, waiting (up
// to the caller's deadline) until the source has all of them.
func (s *Server) FetchSecrets(ctx context.Context, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	p, err := s.authenticate(ctx)
	if err != nil {
		return nil, s.refuse(ctx, p, err)
	}
	p.Node = req.GetNode().GetId()
	if err := checkTypeURL(req.GetTypeUrl()); err != nil {
		return nil, s.refuse(ctx, p, err)
	}
	if len(req.GetResourceNames()) == 0 {
		return nil, s.refuse(ctx, p, errWildcard)
	}
	want, err := kindsOf(req.GetResourceNames())
	if err != nil {
		return nil, s.refuse(ctx, p, err)
	}
	changed := make(chan struct{}, 1)
	w, err := s.src.Watch(ctx, p, wantOf(want), func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	})
	if err != nil {
		return nil, s.refuse(ctx, p, watchError(err))
	}
	defer w.Close()
	for {
		if resp, err := s.fetchResponse(w.Snapshot(), want); err != nil || resp != nil {
			if err != nil {
				return nil, s.refuse(ctx, p, err)
			}
			return resp, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, s.refuse(ctx, p, ctx.Err())
		}
	}
}

// fetchResponse returns nil until snap holds every wanted resource.
func (s *Server) fetchResponse(snap *Snapshot, want [numKinds]bool) (*discoveryv3.DiscoveryResponse, error) {
	if snap == nil {
		return nil, nil
	}
	var out [numKinds]*resource
	for k := range want {
		if !want[k] {
			continue
		}
		r, err := s.enc.get(kind(k), snap)
		if err != nil || r == nil {
			return nil, err
		}
		out[k] = r
	}
	resp := &discoveryv3.DiscoveryResponse{TypeUrl: TypeURL, VersionInfo: formatVersion(out),
		Nonce: strconv.FormatUint(s.nonces.Add(1), 36)}
	for _, r := range out {
		if r != nil {
			resp.Resources = append(resp.Resources, r.any)
		}
	}
	return resp, nil
}

// Acked reports how many connected streams have ACKed a ROOTCA that
// contains the root with fingerprint fp (ca.Fingerprint: SHA-256 of the
// DER, lower-case hex), out of how many streams are subscribed to ROOTCA.
// A root rotation may proceed once acked == connected.
func (s *Server) Acked(fp string) (acked, connected int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rootAcks[fp], s.rootWatchers
}

// PolicyAcked reports how many connected streams have ACKed the policy at
// version (PolicyVersion), out of how many are subscribed to it: how many
// node agents enforce that policy.
func (s *Server) PolicyAcked(version string) (acked, watching int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.policyAcks[version], s.policyWatchers
}

// AckChanged returns a channel that is closed at the next ACK, NACK,
// change of subscription or end of a stream: what Acked and Status report
// may have changed. Take it before reading them, so no change is missed.
func (s *Server) AckChanged() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ackChanged == nil {
		s.ackChanged = make(chan struct{})
	}
	return s.ackChanged
}

// wake closes the channel AckChanged handed out, if any. s.mu is held.
func (s *Server) wake() {
	if s.ackChanged != nil {
		close(s.ackChanged)
		s.ackChanged = nil
	}
}

// StreamStatus is one connected stream.
type StreamStatus struct {
	Peer     Peer
	Protocol string // "sotw" or "delta"
	Since    time.Time
	// Subscribed lists the resources the proxy is subscribed to.
	Subscribed []string
	// Acked maps each resource the proxy has ACKed on this stream (or had
	// at the current version when it connected) to that version.
	Acked map[string]string
	// AckedRoots are the fingerprints in the ACKed ROOTCA.
	AckedRoots []string
	// RejectedRoots are the fingerprints in the last ROOTCA sent, when the
	// proxy rejected the response that carried it (LastNACK says why) and
	// no other ROOTCA was sent since. The proxy keeps AckedRoots.
	RejectedRoots []string
	// Rejected maps each resource whose last version sent the proxy
	// rejected, with no newer one sent since, to that version; nil when
	// there is none. The proxy keeps the version in Acked.
	Rejected map[string]string
	// LastNACK is the error of the proxy's last rejection, if any.
	LastNACK string
}

// Status lists the connected streams, oldest first.
func (s *Server) Status() []StreamStatus {
	s.mu.Lock()
	streams := make([]*stream, 0, len(s.streams))
	for st := range s.streams {
		streams = append(streams, st)
	}
	s.mu.Unlock()
	out := make([]StreamStatus, 0, len(streams))
	for _, st := range streams {
		st.mu.Lock()
		ss := StreamStatus{Peer: st.peer, Protocol: st.proto.String(), Since: st.since,
			Acked: make(map[string]string), LastNACK: st.lastNACK}
		for k, sub := range st.subs {
			if sub.subscribed {
				ss.Subscribed = append(ss.Subscribed, names[k])
			}
			if sub.acked != nil {
				ss.Acked[names[k]] = sub.acked.version
			}
		}
		if r := st.subs[kindRoots].acked; r != nil {
			ss.AckedRoots = append([]string(nil), r.roots...)
		}
		for k := range st.subs {
			r := st.rejected(kind(k))
			if r == nil {
				continue
			}
			if ss.Rejected == nil {
				ss.Rejected = make(map[string]string)
			}
			ss.Rejected[names[k]] = r.version
			if kind(k) == kindRoots {
				ss.RejectedRoots = append([]string(nil), r.roots...)
			}
		}
		st.mu.Unlock()
		out = append(out, ss)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Since.Before(out[j].Since) })
	return out
}

func (s *Server) open(ctx context.Context, proto protocol) (*stream, error) {
	p, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	st := &stream{srv: s, proto: proto, ctx: ctx, since: s.clock.Now(), peer: p}
	s.mu.Lock()
	s.streams[st] = struct{}{}
	s.mu.Unlock()
	s.metrics.streams.WithLabelValues(proto.String()).Inc()
	return st, nil
}

func (s *Server) remove(st *stream) {
	s.mu.Lock()
	delete(s.streams, st)
	s.wake()
	s.mu.Unlock()
	s.metrics.streams.WithLabelValues(st.proto.String()).Dec()
}

func (s *Server) authenticate(ctx context.Context) (Peer, error) {
	p, err := s.auth(ctx)
	if err != nil {
		return Peer{}, &authError{err: err}
	}
	if gp, ok := peer.FromContext(ctx); ok && gp.Addr != nil {
		p.Addr = gp.Addr.String()
	}
	return p, nil
}

func (s *Server) moveRootAcks(old, next []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, fp := range old {
		if s.rootAcks[fp]--; s.rootAcks[fp] <= 0 {
			delete(s.rootAcks, fp)
		}
	}
	for _, fp := range next {
		s.rootAcks[fp]++
	}
}

// movePolicyAck moves a stream's ACKed policy from version old to next
// ("" for none).
func (s *Server) movePolicyAck(old, next string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if old != "" {
		if s.policyAcks[old]--; s.policyAcks[old] <= 0 {
			delete(s.policyAcks, old)
		}
	}
	if next != "" {
		s.policyAcks[next]++
	}
}

// watching counts streams subscribing to (delta 1) or leaving (-1) k.
func (s *Server) watching(k kind, delta int) {
	s.mu.Lock()
	switch k {
	case kindRoots:
		s.rootWatchers += delta
	case kindPolicy:
		s.policyWatchers += delta
	}
	s.mu.Unlock()
}

// noteChange wakes AckChanged's waiters after an ACK, a NACK or a change
// of subscription.
func (s *Server) noteChange() {
	s.mu.Lock()
	s.wake()
	s.mu.Unlock()
}

func (st *stream) peerCopy() Peer {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.peer
}

// endOfStream maps the end of a proxy's requests to the handler's result:
// a proxy closing its side is a normal end.
func endOfStream(err error) error {
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// Errors, classified for the edge.
type (
	// requestError is the proxy's mistake; its text goes back to the proxy.
	requestError struct{ msg string }
	authError    struct{ err error }
	sourceError  struct{ err error }
)

func (e *requestError) Error() string { return "sds: " + e.msg }
func (e *authError) Error() string    { return "sds: authentication: " + e.err.Error() }
func (e *authError) Unwrap() error    { return e.err }
func (e *sourceError) Error() string  { return "sds: source: " + e.err.Error() }
func (e *sourceError) Unwrap() error  { return e.err }

var errWildcard = &requestError{msg: `a request must name the secrets it wants ("default", "ROOTCA", "meshca-mtls-policy"): wildcard subscriptions are not served`}

func unknownResource(name string) error {
	return &requestError{msg: fmt.Sprintf(`unknown resource %q: this server serves "default", "ROOTCA" and "meshca-mtls-policy"`, name)}
}

// errNoPolicy answers a subscription to the policy on a server that has
// none: the name is unknown here, as on a server that predates it.
var errNoPolicy = &requestError{msg: fmt.Sprintf(`unknown resource %q: this server has no mTLS policy to serve`, PolicyName)}

// watchError classifies an error from Source.Watch.
func watchError(err error) error {
	if errors.Is(err, ErrNoPolicy) {
		return errNoPolicy
	}
	return &sourceError{err: err}
}

func wantOf(w [numKinds]bool) Want {
	return Want{Cert: w[kindCert], Roots: w[kindRoots], Policy: w[kindPolicy]}
}

func checkTypeURL(u string) error {
	// Empty is allowed: the type is implicit on the SDS service.
	if u != "" && u != TypeURL {
		return &requestError{msg: fmt.Sprintf("unsupported type URL %q: this server serves only %s", u, TypeURL)}
	}
	return nil
}

// refuse logs err and returns the status the proxy sees. It is the one
// place where errors become gRPC codes.
func (s *Server) refuse(ctx context.Context, p Peer, err error) error {
	st := toStatus(err)
	level := slog.LevelWarn
	if st.Code() == codes.Canceled || st.Code() == codes.DeadlineExceeded {
		level = slog.LevelDebug
	}
	s.log.Log(ctx, level, "SDS request refused", "peer", p.ID.String(), "node", p.Node, "addr", p.Addr,
		"code", st.Code().String(), "err", err)
	return st.Err()
}

func toStatus(err error) *status.Status {
	var reqErr *requestError
	var authErr *authError
	var srcErr *sourceError
	switch {
	case errors.As(err, &reqErr):
		return status.New(codes.InvalidArgument, reqErr.msg)
	case errors.As(err, &authErr):
		if identity.ReasonOf(err) == identity.ReasonUnavailable {
			return status.New(codes.Unavailable, "cannot verify the credential right now; retry")
		}
		return status.New(codes.Unauthenticated, "authentication failed: "+authErr.err.Error())
	case errors.Is(err, context.Canceled):
		return status.New(codes.Canceled, "request cancelled")
	case errors.Is(err, context.DeadlineExceeded):
		return status.New(codes.DeadlineExceeded, "deadline exceeded before the secrets were available")
	case errors.As(err, &srcErr):
		return status.New(codes.Unavailable, "secrets are not available for this proxy right now; retry")
	default:
		return status.New(codes.Internal, "internal error; see the server's log")
	}
}

var _ secretv3.SecretDiscoveryServiceServer = (*Server)(nil)
