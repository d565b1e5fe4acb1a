// Package server runs meshca's network endpoints: the gRPC API over TLS
// (with a serving certificate from meshca's own CA) and the monitoring
// endpoint with /metrics, /healthz and /readyz.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
)

// Service is a gRPC service the server exposes.
type Service interface {
	Register(grpc.ServiceRegistrar)
}

// Check reports whether one dependency is ready; nil means ready. An
// error made with Degraded is shown but leaves the server ready.
type Check func() error

// Degraded marks a check's finding as a problem that does not stop the
// server from doing its job yet (the CA signs on while renewal fails): /readyz
// shows it and still answers 200, so a replica is not taken out of service
// for what every replica shares.
func Degraded(err error) error { return degradedError{err} }

type degradedError struct{ err error }

func (e degradedError) Error() string { return e.err.Error() }
func (e degradedError) Unwrap() error { return e.err }

// Config configures a Server.
type Config struct {
	// GRPCAddr and MonitorAddr are listen addresses (host:port; port 0 picks
	// a free port).
	GRPCAddr    string
	MonitorAddr string
	// CA issues the serving certificate.
	CA ServingIssuer
	// ServerID, DNSNames and IPs go into the serving certificate.
	ServerID spiffeid.ID
	DNSNames []string
	IPs      []net.IP
	Services []Service
	// MaxRecvMsgSize bounds incoming gRPC messages.
	MaxRecvMsgSize int
	// Ready lists named readiness checks for /readyz.
	Ready    map[string]Check
	Gatherer prometheus.Gatherer
	Clock    clockwork.Clock
	Logger   *slog.Logger
}

// Server is meshca's listener set.
type Server struct {
	cfg     Config
	log     *slog.Logger
	serving *servingCert

	mu         sync.Mutex
	grpcLis    net.Listener
	monitorLis net.Listener
}

// New validates cfg. It opens nothing; see Listen and Serve.
func New(cfg Config) (*Server, error) {
	if cfg.CA == nil || cfg.ServerID.IsZero() {
		return nil, fmt.Errorf("server: a CA and a server SPIFFE ID are required")
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxRecvMsgSize <= 0 {
		cfg.MaxRecvMsgSize = 64 << 10
	}
	if cfg.Gatherer == nil {
		cfg.Gatherer = prometheus.NewRegistry()
	}
	return &Server{
		cfg: cfg,
		log: cfg.Logger,
		serving: &servingCert{ca: cfg.CA, id: cfg.ServerID, dnsNames: cfg.DNSNames, ips: cfg.IPs,
			clock: cfg.Clock, log: cfg.Logger},
	}, nil
}

// Listen binds the gRPC and monitoring sockets, so callers (and tests) learn
// the real addresses before Serve.
func (s *Server) Listen() error {
	g, err := net.Listen("tcp", s.cfg.GRPCAddr)
	if err != nil {
		return fmt.Errorf("server: gRPC listener: %w", err)
	}
	m, err := net.Listen("tcp", s.cfg.MonitorAddr)
	if err != nil {
		g.Close()
		return fmt.Errorf("server: monitoring listener: %w", err)
	}
	s.mu.Lock()
	s.grpcLis, s.monitorLis = g, m
	s.mu.Unlock()
	return nil
}

// GRPCAddr is the bound gRPC address, after Listen.
func (s *Server) GRPCAddr() string { return addrOf(&s.mu, &s.grpcLis) }

// MonitorAddr is the bound monitoring address, after Listen.
func (s *Server) MonitorAddr() string { return addrOf(&s.mu, &s.monitorLis) }

func addrOf(mu *sync.Mutex, l *net.Listener) string {
	mu.Lock()
	defer mu.Unlock()
	if *l == nil {
		return ""
	}
	return (*l).Addr().String()
}

// TLSConfig is a server-side TLS configuration presenting meshca's serving
// certificate, renewed as the CA changes, for other listeners (the admin
// API's).
func (s *Server) TLSConfig() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: s.serving.get, Time: s.cfg.Clock.Now}
}

// Run is Listen followed by Serve.
func (s *Server) Run(ctx context.Context) error {
	if err := s.Listen(); err != nil {
		return err
	}
	return s.Serve(ctx)
}

// Serve serves until ctx ends, then drains in-flight requests.
func (s *Server) Serve(ctx context.Context) error {
	s.mu.Lock()
	gl, ml := s.grpcLis, s.monitorLis
	s.mu.Unlock()
	if gl == nil {
		return fmt.Errorf("server: Serve before Listen")
	}
	gs := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(s.TLSConfig())),
		grpc.MaxRecvMsgSize(s.cfg.MaxRecvMsgSize),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	for _, svc := range s.cfg.Services {
		svc.Register(gs)
	}
	hs := &http.Server{Handler: s.monitorMux(), ReadHeaderTimeout: 10 * time.Second}

	errc := make(chan error, 2)
	go func() { errc <- gs.Serve(gl) }()
	go func() {
		if err := hs.Serve(ml); !errors.Is(err, http.ErrServerClosed) {
			errc <- err
			return
		}
		errc <- nil
	}()
	s.log.Info("serving", "grpc", gl.Addr().String(), "monitoring", ml.Addr().String())

	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
		err = fmt.Errorf("server: %w", err)
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stopped := make(chan struct{})
	go func() { gs.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-shutdown.Done():
		gs.Stop()
	}
	_ = hs.Shutdown(shutdown)
	return err
}

func (s *Server) monitorMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.cfg.Gatherer, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		names := make([]string, 0, len(s.cfg.Ready))
		for n := range s.cfg.Ready {
			names = append(names, n)
		}
		sort.Strings(names)
		var b strings.Builder
		ready := true
		for _, n := range names {
			var d degradedError
			if err := s.cfg.Ready[n](); errors.As(err, &d) {
				fmt.Fprintf(&b, "[!] %s degraded: %v\n", n, err)
			} else if err != nil {
				ready = false
				fmt.Fprintf(&b, "[-] %s: %v\n", n, err)
			} else {
				fmt.Fprintf(&b, "[+] %s ok\n", n)
			}
		}
		if !ready {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprint(w, b.String())
	})
	return mux
}
