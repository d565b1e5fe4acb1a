// Package rotationtest has settable stand-ins for what root rotation's
// gates read: the SDS server's stream accounting and the audit ledger.
package rotationtest

import (
	"context"
	"sync"
	"time"

	"github.com/meshca/meshca/internal/rotation"
	"github.com/meshca/meshca/sds"
)

// Proxies stands in for the SDS server's accounting (rotation.Proxies).
// The zero value has no streams.
type Proxies struct {
	mu      sync.Mutex
	streams []sds.StreamStatus
	changed chan struct{}
}

var _ rotation.Proxies = (*Proxies)(nil)

// Status returns the streams last Set.
func (p *Proxies) Status() []sds.StreamStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]sds.StreamStatus(nil), p.streams...)
}

// AckChanged returns a channel closed at the next Set.
func (p *Proxies) AckChanged() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.changed == nil {
		p.changed = make(chan struct{})
	}
	return p.changed
}

// Set replaces the streams and wakes AckChanged's waiters.
func (p *Proxies) Set(streams ...sds.StreamStatus) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.streams = streams
	if p.changed != nil {
		close(p.changed)
		p.changed = nil
	}
}

// Ledger stands in for the audit ledger (rotation.Ledger): it holds
// certificates with their expiry. The zero value holds none.
type Ledger struct {
	mu    sync.Mutex
	certs []rotation.Holding
	err   error
}

var _ rotation.Ledger = (*Ledger)(nil)

// Valid lists the certificates added that are valid at at, or the error
// last passed to Fail.
func (l *Ledger) Valid(_ context.Context, at time.Time) ([]rotation.Holding, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return nil, l.err
	}
	var out []rotation.Holding
	for _, h := range l.certs {
		if at.Before(h.NotAfter) {
			out = append(out, h)
		}
	}
	return out, nil
}

// Add records certificates.
func (l *Ledger) Add(hs ...rotation.Holding) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.certs = append(l.certs, hs...)
}

// Fail makes Valid fail with err from now on; nil makes it succeed again.
func (l *Ledger) Fail(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.err = err
}
