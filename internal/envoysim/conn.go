package envoysim

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
)

// handle runs one downstream connection through the listener's filter
// chain: inspection, chain choice, TLS, then tcp_proxy.
func (s *Sim) handle(ctx context.Context, spec *listenerSpec, c net.Conn) {
	defer c.Close()
	prefix := "listener." + spec.name
	s.count(prefix + ".downstream_cx_total")
	conn, transport := c, transportRaw
	if spec.inspect {
		var ok bool
		if conn, transport, ok = s.inspect(c, spec); !ok {
			s.count(prefix + ".downstream_listener_filter_error")
			return
		}
	}
	chain := spec.choose(transport)
	if chain == nil {
		s.count(prefix + ".no_filter_chain_match")
		s.log.Debug("no filter chain matches", "listener", spec.name, "transport", transport)
		return
	}
	prefix += "." + chain.stat
	s.count(prefix + ".downstream_cx_total")
	if chain.tls != nil {
		tc := tls.Server(conn, s.serverConfig(chain.tls))
		if err := tc.HandshakeContext(ctx); err != nil {
			s.count(prefix + ".ssl.handshake_error")
			s.log.Debug("downstream TLS handshake failed", "listener", spec.name, "chain", chain.stat, "err", err)
			return
		}
		conn = tc
	}
	cl := s.cluster(chain.cluster)
	if cl == nil {
		s.count(prefix + ".no_cluster")
		s.log.Debug("no such cluster", "listener", spec.name, "cluster", chain.cluster)
		return
	}
	up, err := s.connect(ctx, cl)
	if err != nil {
		s.log.Debug("upstream connection failed", "cluster", cl.name, "err", err)
		return
	}
	defer up.Close()
	pipe(conn, up)
}

// inspect reads the first bytes of c, as tls_inspector does, until it can
// tell a TLS record from anything else. It gives up after the listener
// filter timeout (on s.clock): the connection continues as raw_buffer when
// the listener says so, and is closed otherwise.
func (s *Sim) inspect(c net.Conn, spec *listenerSpec) (net.Conn, string, bool) {
	var (
		mu       sync.Mutex
		finished bool
		expired  bool
		timer    clockwork.Timer
	)
	if spec.filterTimeout > 0 {
		timer = s.clock.AfterFunc(spec.filterTimeout, func() {
			mu.Lock()
			defer mu.Unlock()
			if !finished {
				expired = true
				// A deadline in the past ends the pending Read now.
				_ = c.SetReadDeadline(time.Unix(1, 0))
			}
		})
	}
	var buf []byte
	tmp := make([]byte, 8)
	transport := ""
	var err error
	for transport == "" && err == nil {
		var n int
		n, err = c.Read(tmp)
		buf = append(buf, tmp[:n]...)
		transport = detect(buf)
	}
	mu.Lock()
	finished = true
	timedOut := expired
	mu.Unlock()
	if timer != nil {
		timer.Stop()
	}
	if timedOut {
		if err := c.SetReadDeadline(time.Time{}); err != nil {
			return nil, "", false
		}
	}
	if transport == "" {
		if !timedOut || !spec.continueOnTimeout {
			return nil, "", false
		}
		transport = transportRaw
	}
	return &peekedConn{Conn: c, r: io.MultiReader(bytes.NewReader(buf), c)}, transport, true
}

// detect tells from the first bytes whether a connection starts with a TLS
// handshake record; "" means it needs more. It reads the record header
// only, where tls_inspector parses the whole ClientHello.
func detect(b []byte) string {
	const handshake, major = 0x16, 0x03
	switch {
	case len(b) == 0:
		return ""
	case b[0] != handshake:
		return transportRaw
	case len(b) < 3:
		if len(b) == 2 && b[1] != major {
			return transportRaw
		}
		return ""
	case b[1] == major && b[2] <= 0x04:
		return transportTLS
	}
	return transportRaw
}

// peekedConn replays the inspected bytes before the rest of the stream.
type peekedConn struct {
	net.Conn
	r io.Reader
}

func (p *peekedConn) Read(b []byte) (int, error) { return p.r.Read(b) }

func (p *peekedConn) CloseWrite() error { return closeWrite(p.Conn) }

// serverConfig terminates TLS with the latest secrets: each handshake asks
// for them again, so an SDS push applies to the next connection.
func (s *Sim) serverConfig(d *downstreamTLS) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		Time:       s.clock.Now,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			cert, err := s.secrets.certificate(*d.cert)
			if err != nil {
				return nil, err
			}
			cfg := &tls.Config{
				MinVersion:   tls.VersionTLS12,
				Time:         s.clock.Now,
				Certificates: []tls.Certificate{*cert},
			}
			if d.requireClient {
				cfg.ClientAuth = tls.RequireAnyClientCert
			}
			if d.validation != nil {
				v, err := s.secrets.validator(d.validation)
				if err != nil {
					return nil, err
				}
				if !d.requireClient {
					cfg.ClientAuth = tls.RequestClientCert
				}
				// Go's own verification would also check extended key usage
				// and know nothing of SAN matchers; the validator does what
				// Envoy does.
				cfg.VerifyConnection = func(cs tls.ConnectionState) error {
					if len(cs.PeerCertificates) == 0 {
						return nil // allowed: a required certificate was checked by ClientAuth
					}
					return v.verify(cs.PeerCertificates, s.clock.Now())
				}
			}
			return cfg, nil
		},
	}
}

// connect opens a connection to the cluster's next endpoint, with TLS when
// the cluster has an UpstreamTlsContext.
func (s *Sim) connect(ctx context.Context, cl *clusterSpec) (net.Conn, error) {
	prefix := "cluster." + cl.name
	s.count(prefix + ".upstream_cx_total")
	if len(cl.endpoints) == 0 {
		s.count(prefix + ".upstream_cx_none_healthy")
		return nil, errors.New("envoysim: no endpoints")
	}
	ep := cl.endpoints[int(cl.next.Add(1)-1)%len(cl.endpoints)]
	dctx, cancel := clockwork.WithTimeout(ctx, s.clock, cl.connectTimeout)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(dctx, ep.network, ep.address)
	if err != nil {
		s.count(prefix + ".upstream_cx_connect_fail")
		return nil, fmt.Errorf("envoysim: %w", err)
	}
	if cl.tls == nil {
		return raw, nil
	}
	cfg, err := s.clientConfig(cl.tls)
	if err == nil {
		tc := tls.Client(raw, cfg)
		if err = tc.HandshakeContext(dctx); err == nil {
			return tc, nil
		}
	}
	_ = raw.Close()
	s.count(prefix + ".ssl.handshake_error")
	return nil, fmt.Errorf("envoysim: upstream TLS: %w", err)
}

// clientConfig originates TLS with the latest secrets.
func (s *Sim) clientConfig(u *upstreamTLS) (*tls.Config, error) {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		Time:       s.clock.Now,
		ServerName: u.sni,
		// Envoy checks no host name unless told to; the chain and the SAN
		// matchers are checked in VerifyConnection, or nothing is when the
		// context has no validation, as with Envoy.
		InsecureSkipVerify: true,
	}
	if u.cert != nil {
		cert, err := s.secrets.certificate(*u.cert)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{*cert}
	}
	if u.validation != nil {
		v, err := s.secrets.validator(u.validation)
		if err != nil {
			return nil, err
		}
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			return v.verify(cs.PeerCertificates, s.clock.Now())
		}
	}
	return cfg, nil
}

// pipe copies both ways until both directions end, passing a half-close
// on; an error in either direction ends both.
func pipe(a, b net.Conn) {
	var wg sync.WaitGroup
	wg.Add(2)
	copyHalf := func(dst, src net.Conn) {
		defer wg.Done()
		if _, err := io.Copy(dst, src); err != nil {
			_ = a.Close()
			_ = b.Close()
			return
		}
		if err := closeWrite(dst); err != nil {
			_ = dst.Close()
		}
	}
	go copyHalf(a, b)
	go copyHalf(b, a)
	wg.Wait()
}

func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}
