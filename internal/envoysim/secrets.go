package envoysim

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshca/meshca/sds/sdstest"
)

// secrets keeps the SDS subscriptions and the secrets they delivered,
// parsed and ready for the next handshake.
type secrets struct {
	clock  clockwork.Clock
	log    *slog.Logger
	retry  time.Duration
	node   string
	static map[string]*clusterSpec
	notify func()
	wg     *sync.WaitGroup

	mu      sync.Mutex
	sources map[sdsKey]*sdsSource
	held    map[secretRef]*heldSecret
}

// sdsSource is one SDS stream, which Envoy-like sdstest.Client runs.
type sdsSource struct {
	key    sdsKey
	conn   *grpc.ClientConn
	client *sdstest.Client
	names  []string // subscribed; guarded by secrets.mu
}

// heldSecret is a secret as the TLS code uses it.
type heldSecret struct {
	version  string
	cert     *tls.Certificate // a TlsCertificate
	roots    *x509.CertPool   // a validation context's trusted_ca
	matchers []sanMatcher     // and its SAN matchers
}

// check reports whether every ref can be fetched: Envoy needs its SDS
// cluster to be static, and to speak HTTP/2 for gRPC; the simulator also
// needs it on a Unix socket.
func (s *secrets) check(refs []secretRef) error {
	for _, r := range refs {
		c, ok := s.static[r.source.cluster]
		switch {
		case !ok:
			return fmt.Errorf("secret %s: no static cluster %s for its SDS server", r.name, r.source.cluster)
		case !c.http2:
			return fmt.Errorf("secret %s: cluster %s does not speak HTTP/2, which gRPC needs", r.name, c.name)
		case len(c.endpoints) != 1 || c.endpoints[0].network != "unix":
			return fmt.Errorf("secret %s: cluster %s must have one pipe endpoint", r.name, c.name)
		case c.tls != nil:
			return fmt.Errorf("secret %s: SDS over TLS (cluster %s) is not supported", r.name, c.name)
		}
	}
	return nil
}

// ensure subscribes to every ref, starting streams as needed; they run
// until ctx ends.
func (s *secrets) ensure(ctx context.Context, refs []secretRef) error {
	if err := s.check(refs); err != nil {
		return err
	}
	byKey := map[sdsKey][]string{}
	for _, r := range refs {
		if !slices.Contains(byKey[r.source], r.name) {
			byKey[r.source] = append(byKey[r.source], r.name)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, key := range slices.SortedFunc(maps.Keys(byKey), compareKeys) {
		names := byKey[key]
		src, ok := s.sources[key]
		if !ok {
			conn, err := grpc.NewClient("unix://"+s.static[key.cluster].endpoints[0].address,
				grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				return fmt.Errorf("SDS cluster %s: %w", key.cluster, err)
			}
			src = &sdsSource{key: key, conn: conn, names: names,
				client: sdstest.New(sdstest.Config{Conn: conn, Node: s.node, Names: names, Delta: key.delta})}
			s.sources[key] = src
			s.wg.Add(1)
			go s.follow(ctx, src)
			continue
		}
		var add []string
		for _, n := range names {
			if !slices.Contains(src.names, n) {
				add = append(add, n)
			}
		}
		if len(add) == 0 {
			continue
		}
		src.names = append(src.names, add...)
		// A failure here ends the stream; the next one subscribes to all.
		if err := src.client.Subscribe(add...); err != nil {
			s.log.Warn("cannot subscribe to more secrets", "cluster", key.cluster, "names", add, "err", err)
		}
	}
	return nil
}

func compareKeys(a, b sdsKey) int {
	if a.cluster != b.cluster {
		if a.cluster < b.cluster {
			return -1
		}
		return 1
	}
	switch {
	case a.delta == b.delta:
		return 0
	case b.delta:
		return -1
	}
	return 1
}

// follow keeps a stream open, reconnecting after RetryInterval as Envoy
// reconnects with backoff, until ctx ends.
func (s *secrets) follow(ctx context.Context, src *sdsSource) {
	defer s.wg.Done()
	defer src.conn.Close()
	for {
		if err := src.client.Connect(ctx); err != nil {
			s.log.Warn("cannot open an SDS stream", "cluster", src.key.cluster, "err", err)
		} else {
			s.track(ctx, src)
			src.client.Disconnect()
		}
		select {
		case <-ctx.Done():
			return
		case <-s.clock.After(s.retry):
		}
	}
}

// track applies every change the stream delivers until it ends.
func (s *secrets) track(ctx context.Context, src *sdsSource) {
	var seen map[string]string
	for {
		st, err := src.client.Wait(ctx, func(st sdstest.State) bool {
			return !st.Connected || !maps.Equal(versionsOf(st), seen)
		})
		if err != nil {
			return
		}
		if v := versionsOf(st); !maps.Equal(v, seen) {
			seen = v
			s.update(src.key, st)
		}
		if !st.Connected {
			if st.Err != nil {
				s.log.Warn("SDS stream ended", "cluster", src.key.cluster, "err", st.Err)
			}
			return
		}
	}
}

func versionsOf(st sdstest.State) map[string]string {
	m := make(map[string]string, len(st.Secrets))
	for n, sec := range st.Secrets {
		m[n] = sec.Version
	}
	return m
}

// update takes what the stream holds: new versions are parsed, and
// secrets it no longer holds (a delta removal) are dropped.
func (s *secrets) update(key sdsKey, st sdstest.State) {
	s.mu.Lock()
	for name, sec := range st.Secrets {
		ref := secretRef{source: key, name: name}
		if h := s.held[ref]; h != nil && h.version == sec.Version {
			continue
		}
		h, err := parseSecret(sec.Secret)
		if err != nil {
			s.log.Warn("ignoring a secret the simulator cannot use", "name", name, "err", err)
			continue
		}
		h.version = sec.Version
		s.held[ref] = h
		s.log.Debug("secret updated", "name", name, "version", sec.Version)
	}
	for ref := range s.held {
		if _, ok := st.Secrets[ref.name]; ref.source == key && !ok {
			delete(s.held, ref)
		}
	}
	s.mu.Unlock()
	s.notify()
}

func parseSecret(sec *tlsv3.Secret) (*heldSecret, error) {
	if err := only(sec, "name", "tls_certificate", "validation_context"); err != nil {
		return nil, err
	}
	if tc := sec.GetTlsCertificate(); tc != nil {
		if err := only(tc, "certificate_chain", "private_key"); err != nil {
			return nil, err
		}
		chain, err := inline(tc.GetCertificateChain())
		if err != nil {
			return nil, err
		}
		key, err := inline(tc.GetPrivateKey())
		if err != nil {
			return nil, err
		}
		cert, err := tls.X509KeyPair(chain, key)
		if err != nil {
			return nil, err
		}
		return &heldSecret{cert: &cert}, nil
	}
	vc := sec.GetValidationContext()
	if vc == nil {
		return nil, errors.New("neither a certificate nor a validation context")
	}
	matchers, err := parseValidation(vc, true)
	if err != nil {
		return nil, err
	}
	pem, err := inline(vc.GetTrustedCa())
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("trusted_ca holds no certificate")
	}
	return &heldSecret{roots: pool, matchers: matchers}, nil
}

func inline(ds *corev3.DataSource) ([]byte, error) {
	if err := only(ds, "inline_bytes", "inline_string"); err != nil {
		return nil, err
	}
	if s := ds.GetInlineString(); s != "" {
		return []byte(s), nil
	}
	return ds.GetInlineBytes(), nil
}

// certificate is the latest certificate of ref. Without one there is no
// handshake: Envoy would not have activated the listener or cluster yet.
func (s *secrets) certificate(ref secretRef) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.held[ref]
	if h == nil || h.cert == nil {
		return nil, fmt.Errorf("envoysim: certificate %q not received", ref.name)
	}
	return h.cert, nil
}

// validator is the latest validation context of v.
func (s *secrets) validator(v *validationSpec) (*validator, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.held[v.roots]
	if h == nil || h.roots == nil {
		return nil, fmt.Errorf("envoysim: validation context %q not received", v.roots.name)
	}
	return &validator{roots: h.roots, matchers: append(slices.Clone(v.matchers), h.matchers...)}, nil
}

// versions maps each secret held to its version.
func (s *secrets) versions() map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[string]string, len(s.held))
	for ref, h := range s.held {
		m[ref.name] = h.version
	}
	return m
}
