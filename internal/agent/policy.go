package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/internal/policy/envoyconfig"
	"github.com/meshca/meshca/sds"
)

// DefaultPolicyWait bounds the wait for the server's first mTLS policy
// before the agent writes a fail-closed configuration.
const DefaultPolicyWait = 30 * time.Second

// PolicySource says where the policy of the Envoy configuration in force
// came from.
type PolicySource string

const (
	// PolicyFromServer is the mesh's policy, received from the server.
	PolicyFromServer PolicySource = "server"
	// PolicyFallback is FallbackPolicy: no policy came from the server in
	// time, or it serves none.
	PolicyFallback PolicySource = "fallback"
	// PolicyPrevious is a configuration an earlier run of the agent left
	// in the directory, kept instead of the fallback.
	PolicyPrevious PolicySource = "previous"
)

// FallbackPolicy is what the agent enforces when the server's policy does
// not arrive within Config.PolicyWait: mTLS on, STRICT, with only
// policy.Default's exclusion. Failing closed turns a policy the agent
// cannot learn into refused plaintext connections, never into plaintext
// accepted where the mesh requires mTLS.
func FallbackPolicy() policy.Policy {
	p := policy.Default()
	p.Enabled = true
	return p
}

// writeError is a configuration that could not be written: the disk, not
// the policy, is at fault, so the same policy is worth trying again.
type writeError struct{ err error }

func (e *writeError) Error() string { return e.err.Error() }
func (e *writeError) Unwrap() error { return e.err }

// enforcer renders the proxy's Envoy configuration from the mTLS policy
// into a directory Envoy watches. Every write is whole (envoyconfig.Write
// renames complete files into place) and comes from a policy that
// rendered and validated; a failure leaves the last good configuration.
type enforcer struct {
	dir       string
	tmpl      envoyconfig.Proxy // Policy is set per render
	bootstrap *bootstrapv3.Bootstrap
	log       *slog.Logger
	metrics   *metrics

	// settled is closed once a configuration is in place; refused once
	// the server has said it serves no policy.
	settled     chan struct{}
	refused     chan struct{}
	refusedOnce sync.Once

	mu             sync.Mutex
	source         PolicySource // "" until a configuration is in place
	policy         *policy.Policy
	version        string
	lastGood       *envoyconfig.Resources
	lastErr        error
	wroteBootstrap bool
}

// newEnforcer checks the proxy template by rendering it once, so a mistake
// in it fails New rather than the first policy.
func newEnforcer(cfg Config, m *metrics) (*enforcer, error) {
	dir, err := filepath.Abs(cfg.EnvoyConfigDir)
	if err != nil {
		return nil, fmt.Errorf("agent: Envoy configuration directory: %w", err)
	}
	sock, err := filepath.Abs(cfg.SocketPath)
	if err != nil {
		return nil, fmt.Errorf("agent: socket path: %w", err)
	}
	tmpl := cfg.Proxy
	tmpl.SDSSocket = sock
	tmpl.Policy = FallbackPolicy()
	if _, err := envoyconfig.Render(tmpl); err != nil {
		return nil, fmt.Errorf("agent: proxy: %w", err)
	}
	boot, err := envoyconfig.Bootstrap(tmpl, dir)
	if err != nil {
		return nil, fmt.Errorf("agent: proxy: %w", err)
	}
	return &enforcer{dir: dir, tmpl: tmpl, bootstrap: boot, log: cfg.Logger, metrics: m,
		settled: make(chan struct{}), refused: make(chan struct{})}, nil
}

// apply renders p and writes it. It returns a *writeError when the files
// could not be written; the previous configuration is then restored as far
// as the disk allows.
func (e *enforcer) apply(p policy.Policy, version string, from PolicySource) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.applyLocked(p, version, from)
}

func (e *enforcer) applyLocked(p policy.Policy, version string, from PolicySource) error {
	proxy := e.tmpl
	proxy.Policy = p
	r, err := envoyconfig.Render(proxy)
	if err != nil {
		return e.fail("render", fmt.Errorf("agent: render the Envoy configuration: %w", err))
	}
	if err := os.MkdirAll(e.dir, 0o755); err != nil {
		return e.fail("write", &writeError{fmt.Errorf("agent: Envoy configuration directory: %w", err)})
	}
	if err := envoyconfig.Write(e.dir, r); err != nil {
		if e.lastGood != nil {
			// CDS may have been replaced before LDS failed: put back the
			// pair that belongs together.
			if rerr := envoyconfig.Write(e.dir, e.lastGood); rerr != nil {
				e.log.Error("cannot restore the last good Envoy configuration", "dir", e.dir, "err", rerr)
			}
		}
		return e.fail("write", &writeError{fmt.Errorf("agent: write the Envoy configuration: %w", err)})
	}
	if err := e.writeBootstrap(); err != nil {
		return e.fail("write", err)
	}
	e.lastGood = r
	pol := p
	e.settle(&pol, version, from)
	return nil
}

// writeBootstrap writes the bootstrap once, after the first LDS and CDS:
// its presence tells whoever starts Envoy that everything it names is in
// place.
func (e *enforcer) writeBootstrap() error {
	if e.wroteBootstrap {
		return nil
	}
	path := filepath.Join(e.dir, envoyconfig.BootstrapFile)
	if err := envoyconfig.WriteBootstrap(path, e.bootstrap); err != nil {
		return &writeError{fmt.Errorf("agent: write the Envoy bootstrap: %w", err)}
	}
	e.wroteBootstrap = true
	return nil
}

// rejected records a policy from the server that did not parse.
func (e *enforcer) rejected(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	_ = e.fail("parse", err)
}

// fail records a failure at stage (parse, render, write). e.mu is held.
func (e *enforcer) fail(stage string, err error) error {
	e.lastErr = err
	e.metrics.policyFailures.WithLabelValues(stage).Inc()
	return err
}

// settle records what is in force. e.mu is held.
func (e *enforcer) settle(p *policy.Policy, version string, from PolicySource) {
	e.source, e.policy, e.version, e.lastErr = from, p, version, nil
	mode := "unknown"
	if p != nil {
		mode = string(p.ModeFor(e.tmpl.Service.FQDN))
	}
	e.metrics.policyApplied.Reset()
	e.metrics.policyApplied.WithLabelValues(version, string(from), mode).Set(1)
	select {
	case <-e.settled:
	default:
		close(e.settled)
	}
	e.log.Info("Envoy configuration written", "dir", e.dir, "policySource", from, "policyVersion", version,
		"inboundMode", mode)
}

// serverHasNone records that the server serves no policy, so none will
// come from it.
func (e *enforcer) serverHasNone() {
	e.refusedOnce.Do(func() { close(e.refused) })
}

// fallback puts a configuration in place when none is: the valid one an
// earlier run left in the directory, or else one rendered from
// FallbackPolicy. A configuration written since (the server's policy
// arrived) is left alone.
func (e *enforcer) fallback(why string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.source != "" {
		return nil
	}
	if prev, err := e.previous(); err == nil {
		if err := e.writeBootstrap(); err != nil {
			return e.fail("write", err)
		}
		e.lastGood = prev
		e.log.Warn("no mTLS policy from the server; keeping the Envoy configuration of the previous run", "reason", why)
		e.settle(nil, "", PolicyPrevious)
		return nil
	}
	fb := FallbackPolicy()
	version, err := sds.PolicyVersion(fb)
	if err != nil {
		return err
	}
	e.log.Warn("no mTLS policy from the server; enforcing the fail-closed fallback until one arrives",
		"reason", why, "policy", fb.String())
	return e.applyLocked(fb, version, PolicyFallback)
}

// previous reads the LDS and CDS files in the directory, if both are there
// and valid.
func (e *enforcer) previous() (*envoyconfig.Resources, error) {
	return envoyconfig.Read(e.dir)
}

// state is what Status reports of the enforcer.
func (e *enforcer) state() (p *policy.Policy, version string, from PolicySource, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.policy != nil {
		c := *e.policy
		c.Excluded = append([]string(nil), c.Excluded...)
		p = &c
	}
	return p, e.version, e.source, e.lastErr
}

// awaitPolicy waits for the server's first policy. If none is in place
// within PolicyWait, or as soon as the server says it serves none, it
// writes the fallback, retrying a failed write with backoff until it or
// the server's policy is in place.
func (a *Agent) awaitPolicy(ctx context.Context) {
	e := a.enforce
	var timeout <-chan time.Time
	if a.cfg.PolicyWait > 0 {
		t := a.clock.NewTimer(a.cfg.PolicyWait)
		defer t.Stop()
		timeout = t.Chan()
	}
	var why string
	select {
	case <-ctx.Done():
		return
	case <-e.settled:
		return
	case <-e.refused:
		why = "the server serves no mTLS policy"
	case <-timeout:
		why = fmt.Sprintf("none received within %s", a.cfg.PolicyWait)
	}
	for failures := 1; ; failures++ {
		err := e.fallback(why)
		if err == nil {
			return
		}
		delay := a.backoff(failures)
		a.log.Error("cannot write the fallback Envoy configuration", "err", err, "retryIn", delay)
		if _, ok := a.sleepUntil(ctx, a.clock.Now().Add(delay), nil, e.settled); !ok {
			return
		}
	}
}

// parsePolicy reads the policy from its secret.
func parsePolicy(sec *tlsv3.Secret) (policy.Policy, string, error) {
	g := sec.GetGenericSecret()
	if g == nil {
		return policy.Policy{}, "", fmt.Errorf("secret %q is not a generic secret", sds.PolicyName)
	}
	p, err := policy.ParseJSON(g.GetSecret().GetInlineBytes())
	if err != nil {
		return policy.Policy{}, "", fmt.Errorf("secret %q: %w", sds.PolicyName, err)
	}
	v, err := sds.PolicyVersion(p)
	if err != nil {
		return policy.Policy{}, "", fmt.Errorf("secret %q: %w", sds.PolicyName, err)
	}
	return p, v, nil
}

func isWriteError(err error) bool {
	var we *writeError
	return errors.As(err, &we)
}
