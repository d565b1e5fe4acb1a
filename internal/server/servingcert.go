package server

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
)

// ServingIssuer is what the server needs from the CA for its own certificate.
type ServingIssuer interface {
	IssueServing(ctx context.Context, pub crypto.PublicKey, id spiffeid.ID, dnsNames []string, ips []net.IP, ttl time.Duration) (*ca.Issued, error)
	Changed() <-chan struct{}
}

// servingCert hands out the server's TLS certificate, re-issuing it at half
// its lifetime or when the CA changes, so listeners never restart.
type servingCert struct {
	ca       ServingIssuer
	id       spiffeid.ID
	dnsNames []string
	ips      []net.IP
	clock    clockwork.Clock
	log      *slog.Logger

	mu      sync.Mutex
	cert    *tls.Certificate
	renewAt time.Time
	changed <-chan struct{}
}

func (s *servingCert) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cert != nil && s.clock.Now().Before(s.renewAt) && !closed(s.changed) {
		return s.cert, nil
	}
	changed := s.ca.Changed()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("server: serving key: %w", err)
	}
	issued, err := s.ca.IssueServing(context.Background(), key.Public(), s.id, s.dnsNames, s.ips, 0)
	if err != nil {
		if s.cert != nil {
			// Keep serving with the old certificate while it lasts.
			s.log.Error("cannot renew the serving certificate; using the current one", "err", err)
			return s.cert, nil
		}
		return nil, fmt.Errorf("server: serving certificate: %w", err)
	}
	leaf := issued.Leaf()
	c := &tls.Certificate{PrivateKey: key, Leaf: leaf}
	for _, x := range issued.Chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	s.cert, s.changed = c, changed
	s.renewAt = ca.RenewalPoint(leaf.NotBefore, leaf.NotAfter, s.clock.Now(), 0.5)
	s.log.Debug("issued serving certificate", "serial", leaf.SerialNumber.Text(16), "notAfter", leaf.NotAfter)
	return c, nil
}

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
