// Package admin is meshca's administration API: root rotation and mTLS
// policy, as JSON over HTTP, for the meshca CLI.
//
// It is served on a Unix socket (access is the socket file's permissions,
// 0600 in a 0700 directory; the caller's uid, read from the socket, must be
// the server's or root's) and, in a cluster, on a TLS port where callers
// present a Kubernetes bearer token that is checked with TokenReview and
// authorised with a SubjectAccessReview for a verb on a meshca.io resource.
//
// Every request that changes something is written to the audit ledger
// twice: before it is carried out (if that fails, nothing is done) and with
// its result. Refused authorisation is recorded too.
package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/meshca/meshca/internal/audit"
)

// Action is what a request does, in RBAC terms: a verb on a resource of the
// meshca.io API group.
type Action struct {
	Verb     string
	Resource string
}

func (a Action) String() string { return a.Resource + "." + a.Verb }

// Resources and verbs of the admin API.
var (
	GetRoots    = Action{Verb: "get", Resource: "roots"}
	RotateRoots = Action{Verb: "rotate", Resource: "roots"}
	GetMTLS     = Action{Verb: "get", Resource: "mtlspolicies"}
	UpdateMTLS  = Action{Verb: "update", Resource: "mtlspolicies"}
)

// Group is the API group of the resources in SubjectAccessReviews.
const Group = "meshca.io"

// Authorizer decides whether a request may perform an action and names the
// caller. Errors matching ErrUnauthenticated or ErrForbidden are refusals;
// others mean it could not decide.
type Authorizer interface {
	Authorize(r *http.Request, a Action) (principal string, err error)
}

// Refusals an Authorizer returns.
var (
	ErrUnauthenticated = errors.New("admin: unauthenticated")
	ErrForbidden       = errors.New("admin: forbidden")
)

// Recorder is the audit ledger.
type Recorder interface {
	Append(ctx context.Context, r audit.Record) (audit.Record, error)
}

// Handler serves one route: it decodes its own body from r and returns what
// to encode as the answer.
type Handler func(ctx context.Context, r *http.Request) (any, error)

// Route is one endpoint of the API.
type Route struct {
	Method, Path string
	Action       Action
	// Mutates says the route changes state: it is audited.
	Mutates bool
	// Target names what the request acts on, for the audit record.
	Target  string
	Handler Handler
}

// Config configures a Server.
type Config struct {
	Routes []Route
	// Authorizers for each listener kind: Local for the Unix socket, Remote
	// for the TLS port (nil: no TLS port).
	Local  Authorizer
	Remote Authorizer
	Ledger Recorder
	Logger *slog.Logger
}

// Server serves the admin API.
type Server struct {
	cfg Config
	log *slog.Logger

	mu        sync.Mutex
	listeners []net.Listener
}

// New validates cfg. It starts nothing.
func New(cfg Config) (*Server, error) {
	if cfg.Ledger == nil {
		return nil, errors.New("admin: an audit ledger is required")
	}
	if cfg.Local == nil && cfg.Remote == nil {
		return nil, errors.New("admin: no authorizer")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg, log: cfg.Logger}, nil
}

// ListenUnix opens the Unix socket at path: its directory is created 0700
// and the socket made 0600. A stale socket file from a crashed server is
// replaced.
func (s *Server) ListenUnix(path string) (net.Listener, error) {
	if s.cfg.Local == nil {
		return nil, errors.New("admin: no authorizer for the Unix socket")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	if err := os.Chmod(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("admin: removing a stale socket: %w", err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("admin: %w", err)
	}
	s.mu.Lock()
	s.listeners = append(s.listeners, l)
	s.mu.Unlock()
	return l, nil
}

// Serve serves l until ctx ends: the Unix socket with the Local
// authorizer, anything else (a TLS listener) with Remote.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	authz := s.cfg.Remote
	_, local := l.(*net.UnixListener)
	if local {
		authz = s.cfg.Local
	}
	if authz == nil {
		return errors.New("admin: no authorizer for this listener")
	}
	hs := &http.Server{
		Handler:           s.handler(authz),
		ReadHeaderTimeout: 10 * time.Second,
		ConnContext:       withConn,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(l) }()
	select {
	case <-ctx.Done():
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = hs.Shutdown(shutdown)
		if local {
			_ = os.Remove(l.Addr().String())
		}
		return nil
	case err := <-errc:
		return fmt.Errorf("admin: %w", err)
	}
}

type connKey struct{}

func withConn(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

// ConnOf returns the connection a request arrived on.
func ConnOf(r *http.Request) net.Conn {
	c, _ := r.Context().Value(connKey{}).(net.Conn)
	return c
}

// maxBody bounds request bodies: they are small JSON objects.
const maxBody = 64 << 10

func (s *Server) handler(authz Authorizer) http.Handler {
	mux := http.NewServeMux()
	for _, rt := range s.cfg.Routes {
		mux.HandleFunc(rt.Method+" "+rt.Path, func(w http.ResponseWriter, r *http.Request) {
			r.Body = http.MaxBytesReader(w, r.Body, maxBody)
			s.serve(w, r, authz, rt)
		})
	}
	return mux
}

// AuditDetailer is a result with something to add to the audit record of
// the action that produced it, such as the warnings of a forced step.
type AuditDetailer interface {
	AuditDetail() string
}

// requestDetail is the path and compacted JSON body of a request, for its
// audit record, leaving the body readable for the handler.
func requestDetail(r *http.Request) (string, error) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return "", fmt.Errorf("%w: reading the request: %w", ErrInvalid, err)
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	var compact bytes.Buffer
	if len(bytes.TrimSpace(body)) == 0 || json.Compact(&compact, body) != nil || compact.String() == "{}" {
		return r.URL.Path, nil
	}
	return r.URL.Path + " " + compact.String(), nil
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request, authz Authorizer, rt Route) {
	ctx := r.Context()
	principal, err := authz.Authorize(r, rt.Action)
	if err != nil {
		s.record(ctx, r, audit.Record{Actor: principal, Action: rt.Action.String(), Target: rt.Target, Result: "denied", Detail: err.Error()})
		s.log.Warn("Admin request refused", "action", rt.Action.String(), "principal", principal, "err", err)
		writeError(w, err)
		return
	}
	if rt.Mutates {
		// The request body (a mode, names, force) is part of what was
		// asked, so it goes into the record; the handler reads a copy.
		detail, err := requestDetail(r)
		if err != nil {
			s.record(ctx, r, audit.Record{Actor: principal, Action: rt.Action.String(), Target: rt.Target, Result: "failed", Detail: err.Error()})
			writeError(w, err)
			return
		}
		// Nothing is done that the ledger has not first recorded.
		if err := s.record(ctx, r, audit.Record{Actor: principal, Action: rt.Action.String(), Target: rt.Target, Result: "started", Detail: detail}); err != nil {
			writeError(w, fmt.Errorf("%w: the audit ledger is unavailable, so nothing was done: %w", ErrUnavailable, err))
			return
		}
	}
	out, err := rt.Handler(ctx, r)
	if rt.Mutates {
		rec := audit.Record{Actor: principal, Action: rt.Action.String(), Target: rt.Target, Result: "ok", Detail: r.URL.Path}
		if d, ok := out.(AuditDetailer); ok && err == nil {
			if extra := d.AuditDetail(); extra != "" {
				rec.Detail += ": " + extra
			}
		}
		if err != nil {
			rec.Result, rec.Detail = "failed", err.Error()
		}
		if aerr := s.record(ctx, r, rec); aerr != nil {
			s.log.Error("Could not record the result of an admin action", "action", rec.Action, "result", rec.Result, "err", aerr)
		}
		s.log.Info("Admin action", "action", rec.Action, "principal", principal, "result", rec.Result, "err", err)
	}
	if err != nil {
		writeErrorWith(w, err, out)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) record(ctx context.Context, r *http.Request, rec audit.Record) error {
	rec.Kind = audit.KindAdmin
	if rec.Actor == "" {
		rec.Actor = "unknown"
	}
	rec.Peer = r.RemoteAddr
	if rec.Peer == "" || rec.Peer == "@" {
		rec.Peer = "unix"
	}
	// The admin's own context may be cancelled by a client giving up; the
	// record must still be written.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	_, err := s.cfg.Ledger.Append(ctx, rec)
	return err
}

// Errors handlers return, mapped to HTTP statuses.
var (
	// ErrConflict: the request does not apply in the current state (a
	// rotation step whose gate is closed, a stale revision).
	ErrConflict = errors.New("admin: conflict")
	// ErrInvalid: the request is malformed.
	ErrInvalid = errors.New("admin: invalid request")
	// ErrUnavailable: a dependency is down; retry.
	ErrUnavailable = errors.New("admin: unavailable")
)

// ErrorBody is the JSON of an error answer. Status, when set, is the state
// the refused request found (a rotation status naming what blocks it).
type ErrorBody struct {
	Error  string          `json:"error"`
	Code   string          `json:"code"`
	Status json.RawMessage `json:"status,omitempty"`
}

func classify(err error) (int, string) {
	switch {
	case errors.Is(err, ErrUnauthenticated):
		return http.StatusUnauthorized, "unauthenticated"
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden, "forbidden"
	case errors.Is(err, ErrInvalid):
		return http.StatusBadRequest, "invalid"
	case errors.Is(err, ErrConflict):
		return http.StatusConflict, "conflict"
	case errors.Is(err, ErrUnavailable):
		return http.StatusServiceUnavailable, "unavailable"
	default:
		return http.StatusInternalServerError, "internal"
	}
}

func writeError(w http.ResponseWriter, err error) { writeErrorWith(w, err, nil) }

func writeErrorWith(w http.ResponseWriter, err error, status any) {
	code, name := classify(err)
	body := ErrorBody{Error: err.Error(), Code: name}
	if status != nil {
		if b, merr := json.Marshal(status); merr == nil {
			body.Status = b
		}
	}
	writeJSON(w, code, body)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// DecodeBody decodes r's JSON body into v; an empty body leaves v as is.
// Unknown fields are refused, so a misspelt option is not silently
// ignored.
func DecodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return nil
}
