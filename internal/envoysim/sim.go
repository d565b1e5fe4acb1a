package envoysim

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/protobuf/proto"

	"github.com/meshca/meshca/internal/policy/envoyconfig"
)

// Defaults for the zero values of Config.
const (
	DefaultPollInterval  = time.Second
	DefaultRetryInterval = time.Second
)

// acceptRetry is the pause after a failed Accept.
const acceptRetry = 10 * time.Millisecond

// Config configures a Sim.
type Config struct {
	// Bootstrap is the path of the bootstrap file (JSON). Required.
	Bootstrap string
	// PollInterval is how often the LDS and CDS files are read to see
	// whether they changed, where Envoy watches for moves.
	PollInterval time.Duration
	// RetryInterval is how long to wait before reopening an SDS stream
	// that ended.
	RetryInterval time.Duration
	Clock         clockwork.Clock
	Logger        *slog.Logger
}

// Status is what a Sim runs.
type Status struct {
	// Running is set once Run has applied the initial files and bound the
	// listeners, and cleared when it returns.
	Running bool
	// LDS and CDS describe the listener and cluster files.
	LDS, CDS FileStatus
	// Listeners maps each listener to the address it is bound to.
	Listeners map[string]string
	// Secrets maps each SDS secret held to its version.
	Secrets map[string]string
	// Counters are statistics named after Envoy's; see the package
	// documentation.
	Counters map[string]uint64
}

// FileStatus is the state of one configuration file.
type FileStatus struct {
	// Version is the version_info of the content in force.
	Version string
	// Err is why the file's latest content was refused (the previous
	// content stays in force); nil once a content is applied.
	Err error
}

// Sim is a data plane that runs one proxy's Envoy configuration.
type Sim struct {
	cfg   Config
	clock clockwork.Clock
	log   *slog.Logger
	boot  *bootstrap
	ran   atomic.Bool

	secrets  *secrets
	clusters atomic.Pointer[map[string]*clusterSpec]
	wg       sync.WaitGroup // every goroutine Run starts

	lmu       sync.Mutex // guards listeners
	listeners map[string]*runListener

	cmu   sync.Mutex // guards conns
	conns map[net.Conn]struct{}

	mu       sync.Mutex // guards what Status reports
	changed  chan struct{}
	running  bool
	lds, cds FileStatus
	counters map[string]uint64
}

type runListener struct {
	ln   net.Listener
	spec atomic.Pointer[listenerSpec]
}

// New reads and checks the bootstrap. It starts nothing; see Run.
func New(cfg Config) (*Sim, error) {
	if cfg.Bootstrap == "" {
		return nil, errors.New("envoysim: a bootstrap path is required")
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = DefaultRetryInterval
	}
	if cfg.PollInterval < 0 || cfg.RetryInterval < 0 {
		return nil, errors.New("envoysim: negative interval")
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewRealClock()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	boot, err := readBootstrap(cfg.Bootstrap)
	if err != nil {
		return nil, fmt.Errorf("envoysim: %w", err)
	}
	s := &Sim{
		cfg:       cfg,
		clock:     cfg.Clock,
		log:       cfg.Logger,
		boot:      boot,
		listeners: map[string]*runListener{},
		conns:     map[net.Conn]struct{}{},
		changed:   make(chan struct{}),
		counters:  map[string]uint64{},
	}
	s.secrets = &secrets{
		clock: cfg.Clock, log: cfg.Logger, retry: cfg.RetryInterval, node: boot.node,
		static: boot.static, notify: s.notify, wg: &s.wg,
		sources: map[sdsKey]*sdsSource{}, held: map[secretRef]*heldSecret{},
	}
	empty := map[string]*clusterSpec{}
	s.clusters.Store(&empty)
	return s, nil
}

// Run loads the CDS and LDS files, which must exist, serves the listeners
// and follows changes of the files until ctx ends. A file whose content is
// refused leaves the previous content in force, as with Envoy.
func (s *Sim) Run(ctx context.Context) error {
	if s.ran.Swap(true) {
		return errors.New("envoysim: Run called twice")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer func() {
		cancel()
		s.shutdown()
	}()
	cds := &watchedFile{path: s.boot.cds, typeURL: envoyconfig.ClusterType, apply: s.applyCDS}
	lds := &watchedFile{path: s.boot.lds, typeURL: envoyconfig.ListenerType, apply: s.applyLDS}
	for _, f := range []*watchedFile{cds, lds} {
		if _, err := os.Stat(f.path); err != nil {
			return fmt.Errorf("envoysim: %w", err)
		}
	}
	ticker := s.clock.NewTicker(s.cfg.PollInterval)
	defer ticker.Stop()
	// Clusters first, so that new listeners find theirs.
	s.reload(ctx, cds, true)
	s.reload(ctx, lds, true)
	s.setRunning(true)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.Chan():
			s.reload(ctx, cds, false)
			s.reload(ctx, lds, false)
		}
	}
}

// watchedFile is an LDS or CDS file and what was last read from it.
type watchedFile struct {
	path, typeURL string
	apply         func(ctx context.Context, version string, msgs []proto.Message)
	digest        [32]byte
}

// reload reads f and applies it when its bytes changed since the last
// attempt (or always, when first): an unchanged content is not parsed
// again, and a refused one is not retried until it changes.
func (s *Sim) reload(ctx context.Context, f *watchedFile, first bool) {
	data, err := os.ReadFile(f.path)
	var digest [32]byte // zero while the file cannot be read
	if err == nil {
		digest = sha256.Sum256(data)
	}
	if !first && digest == f.digest {
		return
	}
	f.digest = digest
	var version string
	var msgs []proto.Message
	if err == nil {
		version, msgs, err = parseResources(f.path, data, f.typeURL)
	}
	if err != nil {
		s.refuse(f.typeURL, fmt.Errorf("envoysim: %w", err))
		return
	}
	f.apply(ctx, version, msgs)
}

func (s *Sim) refuse(typeURL string, err error) {
	s.log.Warn("configuration refused", "type", typeURL, "err", err)
	s.mu.Lock()
	defer s.mu.Unlock()
	if typeURL == envoyconfig.ClusterType {
		s.cds.Err = err
	} else {
		s.lds.Err = err
	}
	s.notifyLocked()
}

func (s *Sim) applied(typeURL, version string) {
	s.log.Info("configuration applied", "type", typeURL, "version", version)
	s.mu.Lock()
	defer s.mu.Unlock()
	fs := FileStatus{Version: version}
	if typeURL == envoyconfig.ClusterType {
		s.cds = fs
	} else {
		s.lds = fs
	}
	s.notifyLocked()
}

func (s *Sim) applyCDS(ctx context.Context, version string, msgs []proto.Message) {
	specs := map[string]*clusterSpec{}
	var refs []secretRef
	for _, m := range msgs {
		cl, ok := m.(*clusterv3.Cluster)
		if !ok {
			s.refuse(envoyconfig.ClusterType, fmt.Errorf("envoysim: CDS resource of type %T", m))
			return
		}
		c, err := parseCluster(cl)
		switch {
		case err != nil:
		case specs[c.name] != nil:
			err = fmt.Errorf("cluster %s is defined twice", c.name)
		case s.boot.static[c.name] != nil:
			err = fmt.Errorf("cluster %s is also a static cluster", c.name)
		}
		if err != nil {
			s.refuse(envoyconfig.ClusterType, fmt.Errorf("envoysim: %w", err))
			return
		}
		specs[c.name] = c
		refs = append(refs, c.refs()...)
	}
	if err := s.secrets.ensure(ctx, refs); err != nil {
		s.refuse(envoyconfig.ClusterType, fmt.Errorf("envoysim: %w", err))
		return
	}
	s.clusters.Store(&specs)
	s.applied(envoyconfig.ClusterType, version)
}

func (s *Sim) applyLDS(ctx context.Context, version string, msgs []proto.Message) {
	specs := map[string]*listenerSpec{}
	var refs []secretRef
	for _, m := range msgs {
		lm, ok := m.(*listenerv3.Listener)
		if !ok {
			s.refuse(envoyconfig.ListenerType, fmt.Errorf("envoysim: LDS resource of type %T", m))
			return
		}
		l, err := parseListener(lm)
		if err == nil && specs[l.name] != nil {
			err = fmt.Errorf("listener %s is defined twice", l.name)
		}
		if err != nil {
			s.refuse(envoyconfig.ListenerType, fmt.Errorf("envoysim: %w", err))
			return
		}
		specs[l.name] = l
		refs = append(refs, l.refs()...)
	}
	if err := s.secrets.ensure(ctx, refs); err != nil {
		s.refuse(envoyconfig.ListenerType, fmt.Errorf("envoysim: %w", err))
		return
	}
	if err := s.bind(ctx, specs); err != nil {
		s.refuse(envoyconfig.ListenerType, fmt.Errorf("envoysim: %w", err))
		return
	}
	s.applied(envoyconfig.ListenerType, version)
}

// bind makes the running listeners those of specs. A listener whose
// address is unchanged keeps its socket and takes the new configuration
// for its next connections; the others are bound anew, and those gone are
// closed. Either every new socket is bound or nothing changes.
func (s *Sim) bind(ctx context.Context, specs map[string]*listenerSpec) error {
	s.lmu.Lock()
	defer s.lmu.Unlock()
	next := map[string]*runListener{}
	var opened []*runListener
	for name, spec := range specs {
		if old, ok := s.listeners[name]; ok && old.spec.Load().addr == spec.addr {
			next[name] = old
			continue
		}
		ln, err := net.Listen("tcp", spec.addr)
		if err != nil {
			for _, l := range opened {
				_ = l.ln.Close()
			}
			return fmt.Errorf("listener %s: %w", name, err)
		}
		rl := &runListener{ln: ln}
		opened = append(opened, rl)
		next[name] = rl
	}
	for name, rl := range next {
		rl.spec.Store(specs[name])
	}
	for name, old := range s.listeners {
		if next[name] != old {
			_ = old.ln.Close()
		}
	}
	for _, rl := range opened {
		s.wg.Add(1)
		go s.accept(ctx, rl)
	}
	s.listeners = next
	s.notify()
	return nil
}

func (s *Sim) accept(ctx context.Context, rl *runListener) {
	defer s.wg.Done()
	for {
		c, err := rl.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors, say: pause rather than spin.
			s.log.Warn("accept failed", "addr", rl.ln.Addr(), "err", err)
			select {
			case <-ctx.Done():
				return
			case <-s.clock.After(acceptRetry):
			}
			continue
		}
		if !s.track(c) {
			_ = c.Close()
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.untrack(c)
			s.handle(ctx, rl.spec.Load(), c)
		}()
	}
}

// track records c so shutdown can close it; false once shutting down.
func (s *Sim) track(c net.Conn) bool {
	s.cmu.Lock()
	defer s.cmu.Unlock()
	if s.conns == nil {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Sim) untrack(c net.Conn) {
	s.cmu.Lock()
	defer s.cmu.Unlock()
	delete(s.conns, c)
}

// shutdown closes every listener and connection and waits for every
// goroutine; ctx has ended.
func (s *Sim) shutdown() {
	s.lmu.Lock()
	for _, rl := range s.listeners {
		_ = rl.ln.Close()
	}
	s.listeners = map[string]*runListener{}
	s.lmu.Unlock()
	s.cmu.Lock()
	for c := range s.conns {
		_ = c.Close()
	}
	s.conns = nil
	s.cmu.Unlock()
	s.wg.Wait()
	s.setRunning(false)
}

func (s *Sim) setRunning(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.running = on
	s.notifyLocked()
}

func (s *Sim) cluster(name string) *clusterSpec {
	if c := (*s.clusters.Load())[name]; c != nil {
		return c
	}
	return s.boot.static[name]
}

func (s *Sim) count(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.counters[name]++
	s.notifyLocked()
}

func (s *Sim) notify() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.notifyLocked()
}

func (s *Sim) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// Status returns a snapshot of what the simulator runs.
func (s *Sim) Status() Status {
	st, _ := s.status()
	return st
}

func (s *Sim) status() (Status, <-chan struct{}) {
	// The channel first: a change while the rest is read closes it.
	s.mu.Lock()
	changed := s.changed
	s.mu.Unlock()
	listeners := map[string]string{}
	s.lmu.Lock()
	for name, rl := range s.listeners {
		listeners[name] = rl.ln.Addr().String()
	}
	s.lmu.Unlock()
	secrets := s.secrets.versions()
	s.mu.Lock()
	defer s.mu.Unlock()
	return Status{
		Running:   s.running,
		LDS:       s.lds,
		CDS:       s.cds,
		Listeners: listeners,
		Secrets:   secrets,
		Counters:  maps.Clone(s.counters),
	}, changed
}

// Wait blocks until cond holds for the simulator's status, or ctx ends.
func (s *Sim) Wait(ctx context.Context, cond func(Status) bool) (Status, error) {
	for {
		st, changed := s.status()
		if cond(st) {
			return st, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return st, fmt.Errorf("envoysim: condition not met: %w (status %+v)", ctx.Err(), st)
		}
	}
}
