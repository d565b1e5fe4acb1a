// Package loadgen measures meshca's certificate issuance under load: N
// concurrent clients call Istio's CreateCertificate over TLS on loopback for
// a fixed time, as fast as they can or at a fixed total rate, and the result
// reads the end-to-end rate and latency against in-process reference figures
// measured in the same run on the same machine.
//
// Client keys and CSRs are generated before the timed phase: a workload's
// key generation is the workload's cost, not the CA's. Each client makes one
// untimed request first, so TLS handshakes are excluded too, as they are for
// Istio agents that keep their connection to the CA open.
package loadgen

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
)

// Defaults and limits of Config.
const (
	DefaultDuration          = 10 * time.Second
	MaxDuration              = time.Hour
	DefaultReferenceDuration = 2 * time.Second
	DefaultMaxRequests       = 1_000_000
	DefaultTimeout           = 5 * time.Second
	DefaultCSRPool           = 256
	// MaxConcurrency keeps a mistyped flag from opening thousands of
	// connections.
	MaxConcurrency = 1024
)

// DefaultConcurrency is twice GOMAXPROCS: enough requests in flight to keep
// every core of a CPU-bound server busy while others are on the wire or in
// the load generator, without queueing so deep that latency only measures
// the queue.
func DefaultConcurrency() int { return 2 * runtime.GOMAXPROCS(0) }

// Config configures a run.
type Config struct {
	// InProcess starts a Server on 127.0.0.1 and measures against it; Addr,
	// TrustBundle, ServerName and Token must then be empty.
	InProcess bool
	// Audit makes the in-process server record every issuance in an audit
	// ledger, as meshca server does.
	Audit bool
	// AuditCommitDelay is the ledger's audit.Config.CommitDelay (0: its
	// default).
	AuditCommitDelay time.Duration
	// Keys and PerReplicaIntermediates shape the in-process server's CA
	// (ServerOptions); KeysName names the keystore in the report.
	Keys                    ca.KeyStore
	PerReplicaIntermediates bool
	KeysName                string
	// Addr is the target's gRPC address. Only loopback addresses are
	// accepted: this tool saturates what it points at.
	Addr string
	// TrustBundle authenticates the target's TLS certificate.
	TrustBundle []*x509.Certificate
	// ServerName overrides the name expected in the target's certificate.
	ServerName string
	// Token is the bearer token sent with every request.
	Token string

	// Concurrency is the number of clients, each with at most one request
	// in flight (default DefaultConcurrency).
	Concurrency int
	// Connections is the number of TLS connections the clients share
	// (default Concurrency: one per client, as each Istio agent has its
	// own).
	Connections int
	// Duration of the timed phase (default DefaultDuration, at most
	// MaxDuration).
	Duration time.Duration
	// Rate is the total request rate in requests per second; 0 sends the
	// next request as soon as a client's previous one returns. With a rate,
	// latency is measured from when a request was due, not when a client got
	// round to sending it, so a server that falls behind shows its queue in
	// the latency instead of silently lowering the offered load.
	Rate float64
	// MaxRequests bounds the requests of the timed phase, and with them
	// the memory for latency samples (default DefaultMaxRequests).
	MaxRequests int
	// Timeout bounds each request (default DefaultTimeout).
	Timeout time.Duration
	// CSRPool is the number of P-256 keys and CSRs generated before the
	// timed phase and used in turn (default DefaultCSRPool).
	CSRPool int
	// ReferenceDuration is how long each in-process reference measurement
	// runs (default DefaultReferenceDuration).
	ReferenceDuration time.Duration
	// Logger reports progress; nil discards it.
	Logger *slog.Logger
}

func (c *Config) validate() error {
	if c.Audit && !c.InProcess {
		return errors.New("loadgen: the audit ledger option applies to the in-process server only")
	}
	if c.InProcess {
		if c.Addr != "" || len(c.TrustBundle) != 0 || c.ServerName != "" || c.Token != "" {
			return errors.New("loadgen: an in-process run brings its own server, trust bundle and token")
		}
	} else {
		if c.Addr == "" {
			return errors.New("loadgen: no target address (or choose the in-process server)")
		}
		if err := checkLoopback(c.Addr); err != nil {
			return err
		}
		if len(c.TrustBundle) == 0 {
			return errors.New("loadgen: empty trust bundle")
		}
		if c.Token == "" {
			return errors.New("loadgen: no token")
		}
	}
	if c.Concurrency == 0 {
		c.Concurrency = DefaultConcurrency()
	}
	if c.Connections == 0 {
		c.Connections = c.Concurrency
	}
	if c.Duration == 0 {
		c.Duration = DefaultDuration
	}
	if c.MaxRequests == 0 {
		c.MaxRequests = DefaultMaxRequests
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.CSRPool == 0 {
		c.CSRPool = DefaultCSRPool
	}
	if c.ReferenceDuration == 0 {
		c.ReferenceDuration = DefaultReferenceDuration
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	switch {
	case c.Concurrency < 0 || c.Concurrency > MaxConcurrency:
		return fmt.Errorf("loadgen: concurrency %d is outside 1..%d", c.Concurrency, MaxConcurrency)
	case c.Connections < 0 || c.Connections > c.Concurrency:
		return fmt.Errorf("loadgen: %d connections for %d clients; want 1..%d", c.Connections, c.Concurrency, c.Concurrency)
	case c.Duration < 0 || c.Duration > MaxDuration:
		return fmt.Errorf("loadgen: duration %s is outside 0..%s", c.Duration, MaxDuration)
	case c.Rate < 0:
		return fmt.Errorf("loadgen: negative rate %g", c.Rate)
	case c.MaxRequests < 0:
		return fmt.Errorf("loadgen: negative request limit %d", c.MaxRequests)
	case c.Timeout < 0:
		return fmt.Errorf("loadgen: negative timeout %s", c.Timeout)
	case c.CSRPool < 0:
		return fmt.Errorf("loadgen: negative CSR pool size %d", c.CSRPool)
	case c.ReferenceDuration < 0 || c.ReferenceDuration > time.Minute:
		return fmt.Errorf("loadgen: reference duration %s is outside 0..1m", c.ReferenceDuration)
	}
	return nil
}

// checkLoopback accepts "localhost" and loopback IPs only. It does not
// resolve names: what a name resolves to can change between the check and
// the dial.
func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("loadgen: address %q: %w", addr, err)
	}
	if strings.EqualFold(host, "localhost") {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("loadgen: %s is not a loopback address; the load generator only targets servers on this machine", addr)
}

// Result is the outcome of a run.
type Result struct {
	Target    string
	InProcess bool
	// Keys names the in-process server's keystore.
	Keys        string
	GOMAXPROCS  int
	Concurrency int
	Connections int
	// TargetRate is Config.Rate: 0 means unlimited.
	TargetRate float64
	// Duration is the configured length of the timed phase; Elapsed is how
	// long it took until the last response, a little longer.
	Duration time.Duration
	Elapsed  time.Duration

	CSRPool     int
	CSRPoolTime time.Duration
	References  References
	// Warmup is the number of untimed requests, one per client.
	Warmup int

	// Requests were sent in the timed phase; each one is counted in
	// exactly one of Issued, Errors and BadResponses.
	Requests int
	Issued   int
	// Errors counts failed requests by gRPC status code.
	Errors map[codes.Code]int
	// BadResponses counts successful calls whose response did not hold a
	// certificate chain.
	BadResponses int
	// Latency is over the issued certificates.
	Latency Latency
	// Capped reports that MaxRequests ended the run before Duration.
	Capped bool
	// SendLag is, with a rate, how late requests were sent after they were
	// due: the load generator's own lateness (timer wake-ups, clients
	// still busy), which the latency includes.
	SendLag Latency
	// LedgerBatches and LedgerRecords count, with Config.Audit, the audit
	// ledger's group commits (one write and one fsync each) in the timed
	// phase and the records they carried.
	LedgerBatches, LedgerRecords uint64
	// IdleBefore is the fraction of CPU time the machine was idle just
	// before the run, or -1 where that is unknown. On a shared machine,
	// anything else running lowers every figure.
	IdleBefore float64
}

// PerSecond is the end-to-end issuance rate.
func (r *Result) PerSecond() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Issued) / r.Elapsed.Seconds()
}

// BaselineRatio is the end-to-end rate over the raw x509.CreateCertificate
// rate.
func (r *Result) BaselineRatio() float64 {
	return ratio(r.PerSecond(), r.References.Baseline.PerSecond())
}

// IssueRatio is the end-to-end rate over the in-process Authority.Issue
// rate.
func (r *Result) IssueRatio() float64 { return ratio(r.PerSecond(), r.References.Issue.PerSecond()) }

// AuthIssueRatio is the end-to-end rate over the in-process rate of token
// verification plus Authority.Issue: what TLS, gRPC and the load
// generator's share of the CPUs leave of the server's own work.
func (r *Result) AuthIssueRatio() float64 {
	return ratio(r.PerSecond(), r.References.AuthIssue.PerSecond())
}

// Failed is the number of timed requests that did not yield a certificate.
func (r *Result) Failed() int {
	n := r.BadResponses
	for _, c := range r.Errors {
		n += c
	}
	return n
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// Run measures: it generates the CSR pool, connects and warms up every
// client, takes the reference figures, then runs the timed phase. Warm-up
// failures abort the run before anything is measured, since a
// misconfigured target would otherwise produce Duration's worth of
// identical errors.
func Run(ctx context.Context, cfg Config) (_ Result, err error) {
	if err := cfg.validate(); err != nil {
		return Result{}, err
	}
	log := cfg.Logger
	res := Result{
		InProcess:   cfg.InProcess,
		Keys:        cmp.Or(cfg.KeysName, "in-memory"),
		GOMAXPROCS:  runtime.GOMAXPROCS(0),
		Concurrency: cfg.Concurrency,
		Connections: cfg.Connections,
		TargetRate:  cfg.Rate,
		Duration:    cfg.Duration,
		CSRPool:     cfg.CSRPool,
		Errors:      map[codes.Code]int{},
		IdleBefore:  -1,
	}
	if idle, ok := cpuIdle(ctx, idleWindow); ok {
		res.IdleBefore = idle
	}

	// The reference figures need a CA and a token authority in this
	// process: the in-process server's, or a private one otherwise.
	var (
		ref      *stack
		refToken string
		srv      *Server
	)
	if cfg.InProcess {
		if srv, err = StartServer(ctx, ServerOptions{Audit: cfg.Audit, AuditCommitDelay: cfg.AuditCommitDelay,
			Keys: cfg.Keys, PerReplicaIntermediates: cfg.PerReplicaIntermediates}); err != nil {
			return res, err
		}
		// Deferred first, so it runs after the clients are closed and the
		// server's graceful stop has nothing to wait for.
		defer func() { err = errors.Join(err, srv.Close()) }()
		if cfg.Token, err = srv.MintToken(cfg.Duration); err != nil {
			return res, err
		}
		cfg.Addr, cfg.TrustBundle, ref, refToken = srv.Addr(), srv.TrustBundle(), srv.stack, cfg.Token
		log.Info("started the in-process server", "addr", cfg.Addr)
	} else {
		if ref, err = newStack(ctx, nil, false); err != nil {
			return res, err
		}
		defer func() { err = errors.Join(err, ref.close()) }()
		if refToken, err = ref.mintToken(cfg.Duration); err != nil {
			return res, err
		}
	}
	res.Target = cfg.Addr

	log.Info("generating client keys and CSRs", "count", cfg.CSRPool)
	began := time.Now()
	pool, err := newCSRPool(cfg.CSRPool)
	if err != nil {
		return res, err
	}
	res.CSRPoolTime = time.Since(began)

	conns, err := dial(cfg)
	if err != nil {
		return res, err
	}
	defer func() {
		for _, c := range conns {
			err = errors.Join(err, c.Close())
		}
	}()
	workers := make([]*worker, cfg.Concurrency)
	md := metadata.Pairs("authorization", "Bearer "+cfg.Token)
	for i := range workers {
		workers[i] = newWorker(pb.NewIstioCertificateServiceClient(conns[i%len(conns)]), md, pool, i, cfg.Timeout)
	}

	log.Info("connecting and warming up", "clients", cfg.Concurrency, "connections", len(conns))
	if err := warmUp(ctx, workers, pool, cfg.TrustBundle); err != nil {
		return res, err
	}
	res.Warmup = len(workers)

	log.Info("measuring the in-process references", "each", cfg.ReferenceDuration, "goroutines", res.GOMAXPROCS)
	if res.References, err = measureReferences(ctx, ref, refToken, cfg.ReferenceDuration, res.GOMAXPROCS); err != nil {
		return res, err
	}

	log.Info("load", "duration", cfg.Duration, "rate", rateString(cfg.Rate))
	var batches0, records0 uint64
	if srv != nil {
		batches0, records0 = srv.ledgerBatches()
	}
	sched := newSchedule(time.Now(), cfg.Duration, cfg.Rate, cfg.MaxRequests)
	var wg sync.WaitGroup
	for _, w := range workers {
		wg.Go(func() { w.run(ctx, sched) })
	}
	wg.Wait()
	res.Elapsed = time.Since(sched.start)
	if err := ctx.Err(); err != nil {
		return res, fmt.Errorf("loadgen: interrupted: %w", err)
	}
	res.Capped = sched.capped.Load()
	if srv != nil {
		b, r := srv.ledgerBatches()
		res.LedgerBatches, res.LedgerRecords = b-batches0, r-records0
	}

	var samples, lags []time.Duration
	for _, w := range workers {
		res.Requests += w.sent
		res.BadResponses += w.bad
		for c, n := range w.errs {
			res.Errors[c] += n
		}
		samples = append(samples, w.latencies...)
		lags = append(lags, w.lags...)
		w.latencies, w.lags = nil, nil
	}
	res.Issued = len(samples)
	res.Latency = summarise(samples)
	res.SendLag = summarise(lags)
	return res, nil
}

func rateString(r float64) string {
	if r == 0 {
		return "unlimited"
	}
	return fmt.Sprintf("%g/s", r)
}

func dial(cfg Config) ([]*grpc.ClientConn, error) {
	roots := x509.NewCertPool()
	for _, c := range cfg.TrustBundle {
		roots.AddCert(c)
	}
	creds := credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: cfg.ServerName, MinVersion: tls.VersionTLS12})
	conns := make([]*grpc.ClientConn, 0, cfg.Connections)
	for range cfg.Connections {
		// Separate ClientConns are separate TCP and TLS connections.
		c, err := grpc.NewClient(cfg.Addr, grpc.WithTransportCredentials(creds))
		if err != nil {
			for _, c := range conns {
				_ = c.Close()
			}
			return nil, fmt.Errorf("loadgen: %w", err)
		}
		conns = append(conns, c)
	}
	return conns, nil
}

// schedule hands out request slots to the workers: a sequence number, and
// when the request is due.
type schedule struct {
	start, deadline time.Time
	rate            float64
	max             int64
	seq             atomic.Int64
	capped          atomic.Bool
}

func newSchedule(start time.Time, d time.Duration, rate float64, maxRequests int) *schedule {
	return &schedule{start: start, deadline: start.Add(d), rate: rate, max: int64(maxRequests)}
}

// next claims a slot. It returns false once the run is over: past the
// deadline, or out of requests. The deadline is checked first, so a run the
// clock ended is not reported as capped.
func (s *schedule) next() (n int64, due time.Time, ok bool) {
	n = s.seq.Add(1) - 1
	if s.rate > 0 {
		// Offsets from the start, not increments, so rounding never
		// accumulates into drift.
		due = s.start.Add(time.Duration(float64(n) * float64(time.Second) / s.rate))
	} else {
		due = time.Now()
	}
	if !due.Before(s.deadline) {
		return 0, time.Time{}, false
	}
	if n >= s.max {
		s.capped.Store(true)
		return 0, time.Time{}, false
	}
	return n, due, true
}

// worker is one client: at most one request in flight.
type worker struct {
	rpc     pb.IstioCertificateServiceClient
	md      metadata.MD // the authorization header
	timeout time.Duration
	// reqs are this worker's own messages, one per CSR of the pool, so no
	// message is marshalled by two goroutines at once.
	reqs []*pb.IstioCertificateRequest
	id   int

	sent      int
	latencies []time.Duration
	lags      []time.Duration // with a rate only
	errs      map[codes.Code]int
	bad       int
}

func newWorker(rpc pb.IstioCertificateServiceClient, md metadata.MD, pool []clientCSR, id int, timeout time.Duration) *worker {
	reqs := make([]*pb.IstioCertificateRequest, len(pool))
	for i, c := range pool {
		// ValidityDuration 0: the server's default lifetime.
		reqs[i] = &pb.IstioCertificateRequest{Csr: c.pem}
	}
	return &worker{rpc: rpc, md: md, timeout: timeout, reqs: reqs, id: id, errs: map[codes.Code]int{}}
}

func (w *worker) call(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	ctx, cancel := context.WithTimeout(metadata.NewOutgoingContext(ctx, w.md), w.timeout)
	defer cancel()
	return w.rpc.CreateCertificate(ctx, req)
}

func (w *worker) run(ctx context.Context, s *schedule) {
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		n, due, ok := s.next()
		if !ok {
			return
		}
		if wait := time.Until(due); wait > 0 {
			if timer == nil {
				timer = time.NewTimer(wait)
			} else {
				timer.Reset(wait)
			}
			select {
			case <-ctx.Done():
				return
			case <-timer.C:
			}
		}
		if s.rate > 0 {
			w.lags = append(w.lags, time.Since(due))
		}
		resp, err := w.call(ctx, w.reqs[int(n)%len(w.reqs)])
		took := time.Since(due)
		if ctx.Err() != nil {
			// Cut short by our own caller: the server is not to blame.
			return
		}
		w.sent++
		switch {
		case err != nil:
			w.errs[status.Code(err)]++
		case !looksLikeChain(resp.GetCertChain()):
			w.bad++
		default:
			w.latencies = append(w.latencies, took)
		}
	}
}

// looksLikeChain is the timed phase's cheap check of a response: a leaf and
// a root at least, the leaf in PEM. The warm-up verified a full response
// from every client; verifying each one here would put client crypto on the
// cores the server needs.
func looksLikeChain(chain []string) bool {
	return len(chain) >= 2 && strings.HasPrefix(chain[0], "-----BEGIN CERTIFICATE-----")
}
