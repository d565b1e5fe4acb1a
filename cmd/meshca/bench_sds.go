package main

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// Targets of the SDS push load, stated in docs/benchmarks.md.
const (
	sdsPushTarget       = 2 * time.Second
	sdsHeapTargetPerStr = 20 << 10 // bytes of server heap per stream
)

type benchSDSOptions struct {
	streams         int
	perConn         int
	network         string
	delta           bool
	fleet           string
	pushes          int
	timeout         time.Duration
	marshalDuration time.Duration
	json            bool
}

func newBenchSDSCommand(g *globalOptions) *cobra.Command {
	o := &benchSDSOptions{}
	cmd := &cobra.Command{
		Use:   "sds",
		Short: "Push trust bundle changes to many SDS streams and report how long until all ACKed, and the memory per stream",
		Long: `Start an SDS server in this process (sds.Server serving a Broadcaster, as the
node agent does) on a Unix socket or loopback TCP, open --streams concurrent
streams that subscribe to "default" and "ROOTCA" and ACK everything
(sdstest.Fleet), and wait until every stream holds the first bundle and has
ACKed it. Then change the bundle --pushes times (a new root added each
time) and report, for each change, the time from Broadcaster.Set until the
server's ACK accounting (Server.Acked) counts every stream as having ACKed
the new root, cross-checked with Server.Status.

Memory and goroutines per stream are the growth of a process, after garbage
collection, between before the streams opened and once they all settled,
divided by the number of streams. With --fleet process (the default) the
streams run in a child process, so the server's figures are the server's
alone (gRPC transport included) and the child reports the client's; with
--fleet in-process both share one heap and only their sum is reported.

The baseline, measured first in the same run: proto.Marshal of one push as
the server sends it (a DiscoveryResponse carrying the ROOTCA Secret), the
CPU the server cannot avoid spending per stream.`,
		Example: `  meshca bench sds                      # 10,000 streams, one connection each, Unix socket
  meshca bench sds --streams 1000 --json
  meshca bench sds --network tcp --streams-per-conn 100`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			rep, err := runBenchSDS(cmd.Context(), o, log)
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(cmd.OutOrStdout(), rep)
			}
			rep.writeText(cmd.OutOrStdout())
			return nil
		},
	}
	fs := cmd.Flags()
	fs.IntVar(&o.streams, "streams", 10000, "concurrent SDS streams, one proxy each")
	fs.IntVar(&o.perConn, "streams-per-conn", 1, "streams per gRPC connection (1: a connection per proxy, as Envoys connect)")
	fs.StringVar(&o.network, "network", "unix", "where the server listens: unix (a socket in a temporary directory, as the node agent) or tcp (127.0.0.1)")
	fs.BoolVar(&o.delta, "delta", false, "incremental xDS (DeltaSecrets) instead of state of the world")
	fs.StringVar(&o.fleet, "fleet", "process", "where the streams run: process (a child process, so memory is measured per side) or in-process")
	fs.IntVar(&o.pushes, "pushes", 3, "bundle changes to measure, one after the other")
	fs.DurationVar(&o.timeout, "timeout", 2*time.Minute, "give up when the streams have not all ACKed after this long (per phase)")
	fs.DurationVar(&o.marshalDuration, "marshal-duration", time.Second, "length of the proto.Marshal baseline measurement")
	fs.BoolVar(&o.json, "json", false, "print the report as JSON")
	return cmd
}

// sdsBenchReport is what one run measured. Durations are in milliseconds,
// memory in bytes.
type sdsBenchReport struct {
	Machine struct {
		CPUs       int    `json:"cpus"`
		GOMAXPROCS int    `json:"gomaxprocs"`
		Go         string `json:"go"`
		Platform   string `json:"platform"`
		LoadAvg    string `json:"load_average,omitempty"` // at the start, from /proc/loadavg
	} `json:"machine"`
	Streams     int    `json:"streams"`
	Connections int    `json:"connections"`
	Network     string `json:"network"`
	Protocol    string `json:"protocol"`
	Fleet       string `json:"fleet"`

	// Marshal is the baseline: proto.Marshal of one push.
	Marshal struct {
		NsPerOp float64 `json:"ns_per_op"`
		Bytes   int     `json:"bytes"`
		Ops     int     `json:"ops"`
	} `json:"marshal"`
	// ConnectMs is from starting the fleet until every stream ACKed the
	// first bundle: connection set-up included.
	ConnectMs float64        `json:"connect_ms"`
	Pushes    []sdsBenchPush `json:"pushes"`

	// Server is the process running the server; with the fleet in process,
	// it holds the client too (Combined).
	Server   sdsBenchMemory  `json:"server"`
	Client   *sdsBenchMemory `json:"client,omitempty"`
	Combined bool            `json:"server_includes_client"`
	// ClientACKs is how many responses the fleet ACKed in all.
	ClientACKs int64 `json:"client_acks"`

	Targets struct {
		PushMs        float64 `json:"push_ms"`
		PushMet       bool    `json:"push_met"`
		HeapPerStream int     `json:"heap_bytes_per_stream"`
		// HeapMet is nil when the server's heap could not be measured
		// alone and the combined figure exceeds the target.
		HeapMet *bool `json:"heap_met"`
	} `json:"targets"`
}

// sdsBenchPush is one bundle change.
type sdsBenchPush struct {
	Ms float64 `json:"ms"`
	// Acked and Connected are Server.Acked of the new root at the end;
	// Holding counts the streams Server.Status lists with the new root.
	Acked     int `json:"acked"`
	Connected int `json:"connected"`
	Holding   int `json:"status_holding"`
}

// sdsBenchMemory is a process's growth with the streams open and settled.
type sdsBenchMemory struct {
	HeapAllocPerStream  float64 `json:"heap_alloc_bytes_per_stream"`
	HeapInusePerStream  float64 `json:"heap_inuse_bytes_per_stream"`
	GoroutinesPerStream float64 `json:"goroutines_per_stream"`
}

// benchPKI is what the benchmark serves: a root, a workload chain signed
// under it, and new roots to add one per bundle change.
type benchPKI struct {
	root  *x509.Certificate
	chain []*x509.Certificate
	key   crypto.Signer
	extra []*x509.Certificate
}

func runBenchSDS(ctx context.Context, o *benchSDSOptions, log *slog.Logger) (*sdsBenchReport, error) {
	switch {
	case o.streams <= 0:
		return nil, errors.New("bench sds: --streams must be positive")
	case o.perConn <= 0:
		return nil, errors.New("bench sds: --streams-per-conn must be positive")
	case o.pushes <= 0:
		return nil, errors.New("bench sds: --pushes must be positive")
	case o.network != "unix" && o.network != "tcp":
		return nil, fmt.Errorf("bench sds: --network must be unix or tcp, not %q", o.network)
	case o.fleet != "process" && o.fleet != "in-process":
		return nil, fmt.Errorf("bench sds: --fleet must be process or in-process, not %q", o.fleet)
	}
	rep := &sdsBenchReport{Streams: o.streams, Connections: (o.streams + o.perConn - 1) / o.perConn,
		Network: o.network, Protocol: "sotw", Fleet: o.fleet, Combined: o.fleet == "in-process"}
	if o.delta {
		rep.Protocol = "delta"
	}
	rep.Machine.CPUs, rep.Machine.GOMAXPROCS = runtime.NumCPU(), runtime.GOMAXPROCS(0)
	rep.Machine.Go, rep.Machine.Platform = runtime.Version(), runtime.GOOS+"/"+runtime.GOARCH
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		rep.Machine.LoadAvg = strings.Join(strings.Fields(string(b))[:3], " ")
	}

	pki, err := newBenchPKI(o.pushes)
	if err != nil {
		return nil, err
	}
	bundle := func(i int) []*x509.Certificate { return []*x509.Certificate{pki.root, pki.extra[i]} }
	if err := measureMarshal(rep, bundle(0), o.marshalDuration); err != nil {
		return nil, err
	}

	// The server, as the node agent runs it.
	bc := sds.NewBroadcaster()
	if err := bc.Set(sds.Snapshot{Chain: pki.chain, Key: pki.key, Roots: []*x509.Certificate{pki.root}}); err != nil {
		return nil, fmt.Errorf("bench sds: %w", err)
	}
	srv, err := sds.New(sds.Config{Source: bc, Logger: log})
	if err != nil {
		return nil, fmt.Errorf("bench sds: %w", err)
	}
	lis, target, cleanup, err := benchListen(o.network)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	gs := grpc.NewServer()
	srv.Register(gs)
	served := make(chan error, 1)
	go func() { served <- gs.Serve(lis) }()
	defer func() {
		// Stop, not GracefulStop: SDS streams never end by themselves.
		gs.Stop()
		<-served
	}()

	before, goroutines := heapNow()
	start := time.Now()
	var fl benchFleet
	cfg := sdstest.FleetConfig{Target: target, Streams: o.streams, StreamsPerConn: o.perConn, Delta: o.delta}
	if o.fleet == "in-process" {
		fl, err = startInProcessFleet(ctx, cfg)
	} else {
		fl, err = startChildFleet(ctx, cfg)
	}
	if err != nil {
		return nil, fdHint(err)
	}
	defer fl.close()
	if err := waitAllAcked(ctx, srv, ca.Fingerprint(pki.root), o.streams, o.timeout); err != nil {
		return nil, err
	}
	rep.ConnectMs = ms(time.Since(start))

	after, nowGoroutines := heapNow()
	rep.Server = perStream(before, after, goroutines, nowGoroutines, o.streams)
	if rep.Client, err = fl.measure(); err != nil {
		return nil, err
	}

	for i := range o.pushes {
		fp := ca.Fingerprint(pki.extra[i])
		start := time.Now()
		if err := bc.Set(sds.Snapshot{Chain: pki.chain, Key: pki.key, Roots: bundle(i)}); err != nil {
			return nil, fmt.Errorf("bench sds: %w", err)
		}
		if err := waitAllAcked(ctx, srv, fp, o.streams, o.timeout); err != nil {
			return nil, err
		}
		p := sdsBenchPush{Ms: ms(time.Since(start))}
		p.Acked, p.Connected = srv.Acked(fp)
		for _, st := range srv.Status() {
			if slices.Contains(st.AckedRoots, fp) {
				p.Holding++
			}
		}
		rep.Pushes = append(rep.Pushes, p)
	}
	if rep.ClientACKs, err = fl.close(); err != nil {
		return nil, err
	}

	rep.Targets.PushMs = ms(sdsPushTarget)
	rep.Targets.HeapPerStream = sdsHeapTargetPerStr
	rep.Targets.PushMet = true
	for _, p := range rep.Pushes {
		rep.Targets.PushMet = rep.Targets.PushMet && p.Ms < rep.Targets.PushMs && p.Acked == o.streams
	}
	// A combined figure within the target bounds the server's share; one
	// above it says nothing about the server alone.
	if met := rep.Server.HeapAllocPerStream <= sdsHeapTargetPerStr; met || !rep.Combined {
		rep.Targets.HeapMet = &met
	}
	return rep, nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// waitAllAcked waits, on the server's ACK accounting, until all n streams
// have ACKed a bundle holding fp.
func waitAllAcked(ctx context.Context, s *sds.Server, fp string, n int, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		changed := s.AckChanged()
		if acked, connected := s.Acked(fp); acked == n && connected == n {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			acked, connected := s.Acked(fp)
			return fmt.Errorf("bench sds: %d of %d streams ACKed the bundle (%d connected): %w", acked, n, connected, ctx.Err())
		}
	}
}

// heapNow collects garbage and returns the live heap and the goroutines.
func heapNow() (runtime.MemStats, int) {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m, runtime.NumGoroutine()
}

func perStream(before, after runtime.MemStats, g0, g1, n int) sdsBenchMemory {
	return sdsBenchMemory{
		HeapAllocPerStream:  float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(n),
		HeapInusePerStream:  float64(int64(after.HeapInuse)-int64(before.HeapInuse)) / float64(n),
		GoroutinesPerStream: float64(g1-g0) / float64(n),
	}
}

// measureMarshal times proto.Marshal of a push of roots as the server sends
// it on a state-of-the-world stream: the changed ROOTCA, and a version_info
// naming both secrets.
func measureMarshal(rep *sdsBenchReport, roots []*x509.Certificate, d time.Duration) error {
	secret, err := anypb.New(&tlsv3.Secret{Name: sds.RootsName, Type: &tlsv3.Secret_ValidationContext{
		ValidationContext: &tlsv3.CertificateValidationContext{TrustedCa: &corev3.DataSource{
			Specifier: &corev3.DataSource_InlineBytes{InlineBytes: ca.EncodeCerts(roots...)}}}}})
	if err != nil {
		return fmt.Errorf("bench sds: %w", err)
	}
	resp := &discoveryv3.DiscoveryResponse{TypeUrl: sds.TypeURL, Nonce: "2s1",
		VersionInfo: "default=0123456789abcdef,ROOTCA=fedcba9876543210", Resources: []*anypb.Any{secret}}
	start := time.Now()
	var ops int
	for ops == 0 || time.Since(start) < d {
		for range 100 {
			b, err := proto.Marshal(resp)
			if err != nil {
				return fmt.Errorf("bench sds: %w", err)
			}
			rep.Marshal.Bytes = len(b)
		}
		ops += 100
	}
	rep.Marshal.Ops = ops
	rep.Marshal.NsPerOp = float64(time.Since(start)) / float64(ops)
	return nil
}

func benchListen(network string) (net.Listener, string, func(), error) {
	if network == "tcp" {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, "", nil, fmt.Errorf("bench sds: %w", err)
		}
		return lis, lis.Addr().String(), func() {}, nil
	}
	dir, err := os.MkdirTemp("", "meshca-bench-sds-*")
	if err != nil {
		return nil, "", nil, fmt.Errorf("bench sds: %w", err)
	}
	path := filepath.Join(dir, "sds.sock")
	lis, err := net.Listen("unix", path)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, "", nil, fmt.Errorf("bench sds: %w", err)
	}
	return lis, "unix://" + path, func() { _ = os.RemoveAll(dir) }, nil
}

// fdHint explains the usual reason a large fleet fails to start.
func fdHint(err error) error {
	if strings.Contains(err.Error(), "too many open files") {
		return fmt.Errorf("%w (each connection takes a file descriptor on each side: raise `ulimit -n`, use --fleet process, or more --streams-per-conn)", err)
	}
	return err
}

func newBenchPKI(extra int) (*benchPKI, error) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	now := time.Now()
	v := ca.Validity{NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour)}
	root, rootKey, err := benchCA(td, v, nil, nil)
	if err != nil {
		return nil, err
	}
	inter, interKey, err := benchCA(td, v, root, rootKey)
	if err != nil {
		return nil, err
	}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("bench sds: %w", err)
	}
	serial, err := ca.NewSerial(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("bench sds: %w", err)
	}
	tmpl, err := ca.LeafTemplate(spiffeid.RequireFromPath(td, "/ns/bench/sa/proxy"), leafKey.Public(), serial, v)
	if err != nil {
		return nil, err
	}
	leaf, err := benchSign(tmpl, inter, leafKey.Public(), interKey)
	if err != nil {
		return nil, err
	}
	p := &benchPKI{root: root, chain: []*x509.Certificate{leaf, inter}, key: leafKey}
	for range extra {
		r, _, err := benchCA(td, v, nil, nil)
		if err != nil {
			return nil, err
		}
		p.extra = append(p.extra, r)
	}
	return p, nil
}

// benchCA makes a root (parent nil) or an intermediate under parent.
func benchCA(td spiffeid.TrustDomain, v ca.Validity, parent *x509.Certificate, parentKey crypto.Signer) (*x509.Certificate, crypto.Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("bench sds: %w", err)
	}
	serial, err := ca.NewSerial(rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("bench sds: %w", err)
	}
	var tmpl *x509.Certificate
	if parent == nil {
		tmpl, err = ca.RootTemplate(td, key.Public(), serial, v)
		parent, parentKey = tmpl, key
	} else {
		tmpl, err = ca.IntermediateTemplate(td, key.Public(), serial, v)
	}
	if err != nil {
		return nil, nil, err
	}
	c, err := benchSign(tmpl, parent, key.Public(), parentKey)
	return c, key, err
}

func benchSign(tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("bench sds: %w", err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("bench sds: %w", err)
	}
	return c, nil
}

// benchFleet is the streams, wherever they run.
type benchFleet interface {
	// measure returns the client side's memory per stream, nil when it
	// cannot be told apart from the server's.
	measure() (*sdsBenchMemory, error)
	// close ends the streams and returns the ACKs they sent; it may be
	// called again.
	close() (int64, error)
}

type inProcessFleet struct{ f *sdstest.Fleet }

func startInProcessFleet(ctx context.Context, cfg sdstest.FleetConfig) (benchFleet, error) {
	f, err := sdstest.StartFleet(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return &inProcessFleet{f: f}, nil
}

func (f *inProcessFleet) measure() (*sdsBenchMemory, error) { return nil, nil }

func (f *inProcessFleet) close() (int64, error) {
	err := f.f.Close()
	return f.f.Acks(), err
}

// The child process speaks JSON lines: the parent sends the configuration,
// the child answers "ready", then a measurement for each "measure" line,
// and its ACK count once its stdin closes.
type (
	fleetChildConfig struct {
		Target  string `json:"target"`
		Streams int    `json:"streams"`
		PerConn int    `json:"per_conn"`
		Delta   bool   `json:"delta"`
	}
	fleetChildReply struct {
		Ready  bool            `json:"ready,omitempty"`
		Memory *sdsBenchMemory `json:"memory,omitempty"`
		Done   bool            `json:"done,omitempty"`
		ACKs   int64           `json:"acks"`
		Err    string          `json:"err,omitempty"`
	}
)

type childFleet struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *bufio.Scanner
	closed bool
	acks   int64
	err    error
}

// startChildFleet runs the streams in this program started again as
// "meshca bench sds-fleet".
func startChildFleet(ctx context.Context, cfg sdstest.FleetConfig) (benchFleet, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("bench sds: %w", err)
	}
	cmd := exec.CommandContext(ctx, self, "bench", "sds-fleet")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("bench sds: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("bench sds: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("bench sds: fleet process: %w", err)
	}
	f := &childFleet{cmd: cmd, stdin: stdin, out: bufio.NewScanner(stdout)}
	if err := json.NewEncoder(stdin).Encode(fleetChildConfig{Target: cfg.Target, Streams: cfg.Streams,
		PerConn: cfg.StreamsPerConn, Delta: cfg.Delta}); err != nil {
		_, _ = f.close()
		return nil, fmt.Errorf("bench sds: fleet process: %w", err)
	}
	if _, err := f.reply(); err != nil {
		_, cerr := f.close()
		return nil, errors.Join(err, cerr)
	}
	return f, nil
}

func (f *childFleet) reply() (fleetChildReply, error) {
	var r fleetChildReply
	if !f.out.Scan() {
		return r, fmt.Errorf("bench sds: fleet process ended early: %w", errors.Join(f.out.Err(), io.ErrUnexpectedEOF))
	}
	if err := json.Unmarshal(f.out.Bytes(), &r); err != nil {
		return r, fmt.Errorf("bench sds: fleet process said %q: %w", f.out.Text(), err)
	}
	if r.Err != "" {
		return r, fmt.Errorf("bench sds: fleet process: %s", r.Err)
	}
	return r, nil
}

func (f *childFleet) measure() (*sdsBenchMemory, error) {
	if _, err := io.WriteString(f.stdin, "measure\n"); err != nil {
		return nil, fmt.Errorf("bench sds: fleet process: %w", err)
	}
	r, err := f.reply()
	if err != nil {
		return nil, err
	}
	return r.Memory, nil
}

func (f *childFleet) close() (int64, error) {
	if f.closed {
		return f.acks, f.err
	}
	f.closed = true
	_ = f.stdin.Close()
	r, err := f.reply()
	werr := f.cmd.Wait()
	if err == nil && werr != nil {
		err = fmt.Errorf("bench sds: fleet process: %w", werr)
	}
	f.acks, f.err = r.ACKs, err
	return f.acks, f.err
}

// newBenchSDSFleetCommand is the child process of "bench sds".
func newBenchSDSFleetCommand() *cobra.Command {
	return &cobra.Command{
		Use:    "sds-fleet",
		Short:  "The streams of `meshca bench sds`, in a process of their own (reads its configuration on stdin)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runFleetChild(cmd.Context(), cmd.InOrStdin(), cmd.OutOrStdout())
		},
	}
}

func runFleetChild(ctx context.Context, in io.Reader, out io.Writer) error {
	enc := json.NewEncoder(out)
	lines := bufio.NewScanner(in)
	if !lines.Scan() {
		return errors.New("bench sds-fleet: no configuration on stdin")
	}
	var cfg fleetChildConfig
	if err := json.Unmarshal(lines.Bytes(), &cfg); err != nil {
		return fmt.Errorf("bench sds-fleet: %w", err)
	}
	before, goroutines := heapNow()
	f, err := sdstest.StartFleet(ctx, sdstest.FleetConfig{Target: cfg.Target, Streams: cfg.Streams,
		StreamsPerConn: cfg.PerConn, Delta: cfg.Delta})
	if err != nil {
		return enc.Encode(fleetChildReply{Err: fdHint(err).Error()})
	}
	if err := enc.Encode(fleetChildReply{Ready: true}); err != nil {
		_ = f.Close()
		return err
	}
	for lines.Scan() {
		if lines.Text() != "measure" {
			continue
		}
		after, now := heapNow()
		m := perStream(before, after, goroutines, now, cfg.Streams)
		if err := enc.Encode(fleetChildReply{Memory: &m, ACKs: f.Acks()}); err != nil {
			_ = f.Close()
			return err
		}
	}
	r := fleetChildReply{Done: true}
	if err := f.Close(); err != nil {
		r.Err = err.Error()
	}
	r.ACKs = f.Acks()
	return enc.Encode(r)
}

func (r *sdsBenchReport) writeText(w io.Writer) {
	fmt.Fprintf(w, "machine      %d CPUs, GOMAXPROCS %d, %s %s", r.Machine.CPUs, r.Machine.GOMAXPROCS, r.Machine.Go, r.Machine.Platform)
	if r.Machine.LoadAvg != "" {
		fmt.Fprintf(w, ", load average %s at the start", r.Machine.LoadAvg)
	}
	fleet := "in a child process"
	if r.Combined {
		fleet = "in this process"
	}
	fmt.Fprintf(w, "\nserver       sds.Server serving a Broadcaster, in this process, on %s\n", map[string]string{"unix": "a Unix socket", "tcp": "loopback TCP"}[r.Network])
	fmt.Fprintf(w, "proxies      %d streams (%s) on %d connections: sdstest.Fleet %s, ACKing every response\n\n",
		r.Streams, r.Protocol, r.Connections, fleet)

	n := float64(r.Streams)
	fmt.Fprintf(w, "baseline     proto.Marshal of one push (DiscoveryResponse with the ROOTCA Secret, 2 roots, %d B)\n", r.Marshal.Bytes)
	fmt.Fprintf(w, "             %.2f µs/op; %d of them: %.1f ms of one core\n\n",
		r.Marshal.NsPerOp/1e3, r.Streams, r.Marshal.NsPerOp*n/1e6)

	fmt.Fprintf(w, "first bundle %d streams opened and ACKed in %s (connection set-up included)\n\n", r.Streams, fmtMs(r.ConnectMs))
	fmt.Fprintf(w, "bundle change (a new root added), Broadcaster.Set until Server.Acked counts every stream:\n")
	var times []float64
	for i, p := range r.Pushes {
		fmt.Fprintf(w, "  change %d   %9s   Acked %d of %d connected; Status: %d streams hold the new root\n",
			i+1, fmtMs(p.Ms), p.Acked, p.Connected, p.Holding)
		times = append(times, p.Ms)
	}
	sort.Float64s(times)
	if len(times) > 0 {
		median := times[len(times)/2]
		fmt.Fprintf(w, "  median %s, max %s; the median is %.0f× the marshal baseline for %d streams\n\n",
			fmtMs(median), fmtMs(times[len(times)-1]), median*1e6/(r.Marshal.NsPerOp*n), r.Streams)
	}

	fmt.Fprintf(w, "memory       growth after GC, streams open and settled, per stream\n")
	if r.Combined {
		fmt.Fprintf(w, "  server + client (one process, not separable)  heap %s (HeapAlloc), %s (HeapInuse), %.2f goroutines\n",
			fmtKiB(r.Server.HeapAllocPerStream), fmtKiB(r.Server.HeapInusePerStream), r.Server.GoroutinesPerStream)
	} else {
		fmt.Fprintf(w, "  server process  heap %s (HeapAlloc), %s (HeapInuse), %.2f goroutines (gRPC transport included)\n",
			fmtKiB(r.Server.HeapAllocPerStream), fmtKiB(r.Server.HeapInusePerStream), r.Server.GoroutinesPerStream)
		if r.Client != nil {
			fmt.Fprintf(w, "  client process  heap %s (HeapAlloc), %s (HeapInuse), %.2f goroutines (sdstest.Fleet, not Envoy)\n",
				fmtKiB(r.Client.HeapAllocPerStream), fmtKiB(r.Client.HeapInusePerStream), r.Client.GoroutinesPerStream)
		}
	}
	fmt.Fprintf(w, "ACKs sent    %d by the fleet (%d streams × %d responses)\n\n", r.ClientACKs, r.Streams, 1+len(r.Pushes))

	fmt.Fprintf(w, "targets\n")
	fmt.Fprintf(w, "  every change pushed and ACKed by all %d in < %s: %s (max %s)\n", r.Streams, fmtMs(r.Targets.PushMs),
		metOrNot(r.Targets.PushMet), fmtMs(times[len(times)-1]))
	heap := "not measurable here: server and client share the heap and together exceed it; use --fleet process"
	if r.Targets.HeapMet != nil {
		heap = fmt.Sprintf("%s (server %s)", metOrNot(*r.Targets.HeapMet), fmtKiB(r.Server.HeapAllocPerStream))
		if r.Combined {
			heap = fmt.Sprintf("%s (server and client together %s)", metOrNot(*r.Targets.HeapMet), fmtKiB(r.Server.HeapAllocPerStream))
		}
	}
	fmt.Fprintf(w, "  ≤ %s of server heap per stream: %s\n", fmtKiB(float64(r.Targets.HeapPerStream)), heap)
}

func metOrNot(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

func fmtMs(v float64) string {
	if v >= 1000 {
		return fmt.Sprintf("%.2f s", v/1000)
	}
	return fmt.Sprintf("%.1f ms", v)
}

func fmtKiB(b float64) string { return fmt.Sprintf("%.1f KiB", b/1024) }
