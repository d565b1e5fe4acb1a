package agent

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/caclient"
)

// renew obtains the certificate and keeps it fresh until ctx ends. It is the
// only writer of the certificate, so a renewal never races another.
func (a *Agent) renew(ctx context.Context) {
	var f fetcher
	defer f.close()
	failures := 0
	a.mu.Lock()
	next := a.next
	a.mu.Unlock()
	for {
		kicked, ok := a.sleepUntil(ctx, a.wakeAt(next), a.kick, a.resched)
		if !ok {
			return
		}
		if kicked {
			next = a.clock.Now()
		}
		a.mu.Lock()
		if !a.rotateAt.IsZero() && a.rotateAt.Before(next) {
			next = a.rotateAt
		}
		a.mu.Unlock()
		// Withdraw before trying: the attempt may take a while, and the
		// proxy must not be handed an expired certificate meanwhile.
		a.expire()
		if a.clock.Now().Before(next) {
			continue
		}

		// This request answers any kick so far; checkChain kicks again if
		// the bundle changes under it.
		select {
		case <-a.kick:
		default:
		}
		creds, used, err := f.fetch(ctx, a)
		if ctx.Err() != nil {
			return
		}
		now := a.clock.Now()
		a.mu.Lock()
		if err != nil {
			failures++
			delay := a.backoff(failures)
			next = now.Add(delay)
			a.next, a.lastErr = next, err
			a.logFailure(err, failures, delay)
			a.metrics.renewals.WithLabelValues("failure").Inc()
			a.mu.Unlock()
			// A new connection for the next attempt: our backoff paces the
			// retries, not gRPC's reconnect backoff on a broken one.
			f.close()
			continue
		}
		failures = 0
		a.creds, a.withdrawn, a.lastErr, a.rotateAt = creds, false, nil, time.Time{}
		// Never sooner than RetryMin: a server that grants certificates
		// already past their renewal point must not be asked in a loop.
		next = later(a.renewalTime(creds, now), now.Add(a.cfg.RetryMin))
		a.next = next
		// Metrics before publishing, so whoever sees the new certificate
		// sees it counted.
		a.metrics.renewals.WithLabelValues("success").Inc()
		a.metrics.expiry.Set(float64(creds.NotAfter.Unix()))
		// caclient adds the root the server sent when the roots it verified
		// with lacked it. That is how a rotation reaches an agent whose
		// server has no ROOTCA stream; the stream's bundle still wins.
		roots := a.roots
		for _, r := range creds.Roots {
			if !slices.ContainsFunc(used, r.Equal) && !slices.ContainsFunc(roots, r.Equal) {
				roots = append(append([]*x509.Certificate(nil), roots...), r)
			}
		}
		// A change of roots publishes the new certificate with them and
		// checks it; otherwise the bundle may still have changed while the
		// request was out.
		if !a.setRoots(roots, "certificate response") {
			a.checkChain()
			a.publish()
		}
		a.mu.Unlock()
		a.log.Info("obtained workload certificate", "id", creds.ID.String(),
			"serial", creds.Chain[0].SerialNumber.Text(16), "notAfter", creds.NotAfter, "renewAt", next)
	}
}

// wakeAt is when the loop must next look: the next attempt, or the end of
// the certificate's life if that comes first.
func (a *Agent) wakeAt(next time.Time) time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c := a.creds; c != nil && !a.withdrawn && c.NotAfter.Before(next) {
		return c.NotAfter
	}
	return next
}

// sleepUntil waits on one timer until t, a receive on kick (nil: none), on
// wake (nil: none; returns early, not kicked) or the end of ctx; ok is
// false when ctx ended.
func (a *Agent) sleepUntil(ctx context.Context, t time.Time, kick, wake <-chan struct{}) (kicked, ok bool) {
	d := t.Sub(a.clock.Now())
	if d <= 0 {
		return false, ctx.Err() == nil
	}
	timer := a.clock.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return false, false
	case <-timer.Chan():
		return false, true
	case <-kick:
		return true, true
	case <-wake:
		return false, true
	}
}

// renewalTime is when c, received at received, is due: RenewAt ± Jitter of
// its lifetime (ending at the chain's earliest expiry), by
// ca.RenewalPoint. It is rounded to the millisecond, well below what
// matters and exact enough to reason about.
func (a *Agent) renewalTime(c *caclient.Credentials, received time.Time) time.Time {
	frac := a.cfg.RenewAt + a.cfg.Jitter*(2*a.random()-1)
	return ca.RenewalPoint(c.Chain[0].NotBefore, c.NotAfter, received, frac).Round(time.Millisecond)
}

// expire withdraws the certificate once it is no longer valid.
func (a *Agent) expire() {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := a.creds
	if c == nil || a.withdrawn || a.clock.Now().Before(c.NotAfter) {
		return
	}
	a.withdrawn = true
	a.publish()
	a.log.Error("WORKLOAD CERTIFICATE EXPIRED without a replacement: withdrawn, the proxy has no certificate to present until renewal succeeds",
		"id", c.ID.String(), "serial", c.Chain[0].SerialNumber.Text(16), "notAfter", c.NotAfter,
		"lastError", a.lastErr, "nextAttempt", a.next)
}

// logFailure logs a failed request, louder once nothing valid is served.
// a.mu is held.
func (a *Agent) logFailure(err error, failures int, delay time.Duration) {
	level, msg := slog.LevelWarn, "cannot renew the workload certificate; still serving the current one"
	switch {
	case a.creds == nil:
		msg = "cannot obtain the workload certificate"
	case a.withdrawn:
		level, msg = slog.LevelError, "cannot renew the expired workload certificate; the proxy has none"
	}
	args := []any{"err", err, "failures", failures, "retryIn", delay}
	if a.creds != nil {
		args = append(args, "notAfter", a.creds.NotAfter)
	}
	a.log.Log(context.Background(), level, msg, args...)
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// fetcher requests certificates with a caclient.Client built for the
// current roots; a change of roots builds a new one (they are cheap: no
// I/O until used).
type fetcher struct {
	client *caclient.Client
	gen    uint64
}

// fetch returns the credentials and the roots they were verified with.
func (f *fetcher) fetch(ctx context.Context, a *Agent) (*caclient.Credentials, []*x509.Certificate, error) {
	token, err := a.readToken()
	if err != nil {
		return nil, nil, err
	}
	roots, gen := a.trust()
	if f.client == nil || f.gen != gen {
		f.close()
		c, err := caclient.New(caclient.Config{Address: a.cfg.ServerAddr, TrustBundle: roots,
			ServerName: a.cfg.ServerName, ClusterID: a.cfg.ClusterID})
		if err != nil {
			return nil, nil, fmt.Errorf("agent: %w", err)
		}
		f.client, f.gen = c, gen
	}
	creds, err := f.client.Fetch(ctx, caclient.Request{Token: token, KeyType: a.cfg.KeyType, TTL: a.cfg.TTL})
	if err != nil {
		return nil, nil, fmt.Errorf("agent: fetch certificate: %w", err)
	}
	return creds, roots, nil
}

func (f *fetcher) close() {
	if f.client != nil {
		_ = f.client.Close()
		f.client = nil
	}
}
