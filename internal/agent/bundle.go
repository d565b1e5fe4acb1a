package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/policy"
	"github.com/meshca/meshca/sds"
)

// followBundle keeps a ROOTCA subscription open on the server's SDS
// service, so a new trust bundle reaches the proxy as soon as the server
// has it rather than at the next renewal. Each bundle is ACKed to the
// server only once the local proxies have ACKed it, and NACKed if one of
// them rejects it. With EnvoyConfigDir the same stream carries the mTLS
// policy. It reconnects with backoff until ctx ends.
func (a *Agent) followBundle(ctx context.Context) {
	failures := 0
	askPolicy := a.enforce != nil
	for {
		began := a.clock.Now()
		received, err := a.streamBundle(ctx, askPolicy)
		if ctx.Err() != nil {
			return
		}
		if askPolicy && policyRefused(err) {
			// A server without a policy (or older than the resource) ends
			// the stream; the bundle is still worth following, at once.
			// The next stream that ends for any reason asks again: a
			// server restarted with a policy then serves it.
			askPolicy = false
			a.enforce.serverHasNone()
			a.log.Warn("the server serves no mTLS policy; following the trust bundle alone", "err", err)
			continue
		}
		askPolicy = a.enforce != nil
		// A stream that worked for a while earns a quick reconnect.
		if received || a.clock.Since(began) >= a.cfg.RetryMax {
			failures = 0
		}
		failures++
		delay := a.backoff(failures)
		a.log.Warn("trust bundle stream to the server ended; reconnecting", "err", err, "failures", failures, "retryIn", delay)
		if _, ok := a.sleepUntil(ctx, a.clock.Now().Add(delay), nil, nil); !ok {
			return
		}
	}
}

// policyRefused reports whether err ended a stream because the server does
// not serve the policy: sds answers an unknown name with InvalidArgument
// naming it.
func policyRefused(err error) bool {
	st, ok := status.FromError(err)
	return ok && st.Code() == codes.InvalidArgument && strings.Contains(st.Message(), strconv.Quote(sds.PolicyName))
}

// streamBundle runs one stream, on a connection of its own that trusts the
// current roots, until it breaks. received reports whether the server
// answered at all and the stream did not end to retry a failed write.
func (a *Agent) streamBundle(ctx context.Context, askPolicy bool) (received bool, err error) {
	token, err := a.readToken()
	if err != nil {
		return false, err
	}
	roots, _ := a.trust()
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	creds := credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, ServerName: a.cfg.ServerName})
	conn, err := grpc.NewClient(a.cfg.ServerAddr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return false, fmt.Errorf("agent: %w", err)
	}
	defer conn.Close()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	md := metadata.Pairs("authorization", "Bearer "+token)
	if a.cfg.ClusterID != "" {
		md.Set("clusterid", a.cfg.ClusterID)
	}
	stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(metadata.NewOutgoingContext(ctx, md))
	if err != nil {
		return false, fmt.Errorf("agent: open trust bundle stream: %w", err)
	}
	names := []string{sds.RootsName}
	if askPolicy {
		names = append(names, sds.PolicyName)
	}
	// No version_info, unlike a reconnecting Envoy: the server then sends
	// its bundle (and policy) on every new stream, and they replace
	// whatever the agent pieced together meanwhile.
	err = stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: a.node}, TypeUrl: sds.TypeURL,
		ResourceNames: names})
	var version string // of the last response applied
	for err == nil || errors.Is(err, io.EOF) {
		// A failed Send says only io.EOF; Recv has the stream's status.
		var resp *discoveryv3.DiscoveryResponse
		if resp, err = stream.Recv(); err != nil {
			break
		}
		received = true
		reject, retry := a.handleResponse(ctx, resp)
		if ctx.Err() != nil {
			err = ctx.Err()
			break
		}
		ack := &discoveryv3.DiscoveryRequest{TypeUrl: sds.TypeURL, ResourceNames: names, ResponseNonce: resp.GetNonce()}
		if reject != nil {
			// NACK: echo the version still in use, as Envoy does.
			ack.VersionInfo = version
			ack.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: reject.Error()}
		} else {
			version = resp.GetVersionInfo()
			ack.VersionInfo = version
		}
		if err = stream.Send(ack); err == nil && retry != nil {
			// The server sends a version once per stream: a new stream,
			// after the backoff, brings the policy again. Half-close and
			// let the server end the stream, so the NACK is read first.
			if err = stream.CloseSend(); err == nil {
				for err == nil {
					_, err = stream.Recv()
				}
			}
			return false, fmt.Errorf("agent: %w; retrying on a new stream", retry)
		}
	}
	return received, fmt.Errorf("agent: trust bundle stream: %w", err)
}

// handleResponse applies what one response carries: a trust bundle, once
// the local proxies have it, and a policy, once its configuration is
// written. reject, when set, is why the response is NACKed; retry is set
// when the policy could not be written and is worth another try.
func (a *Agent) handleResponse(ctx context.Context, resp *discoveryv3.DiscoveryResponse) (reject, retry error) {
	got, err := parseResponse(resp)
	if err != nil {
		if errors.Is(err, errBadPolicy) && a.enforce != nil {
			a.enforce.rejected(err)
		}
		a.log.Warn("rejected a response from the server; keeping what it replaces", "err", err)
		return err, nil
	}
	var errs []error
	if got.roots != nil {
		a.mu.Lock()
		a.setRoots(got.roots, "server ROOTCA stream")
		a.pending = fingerprints(got.roots)
		a.mu.Unlock()
		perr := a.awaitProxies(ctx)
		a.mu.Lock()
		a.pending = nil
		a.mu.Unlock()
		if ctx.Err() != nil {
			return ctx.Err(), nil
		}
		if perr != nil {
			a.log.Warn("a local proxy rejected the trust bundle; rejecting it upstream", "err", perr)
			errs = append(errs, perr)
		}
	}
	if got.policy != nil && a.enforce != nil {
		if err := a.enforce.apply(*got.policy, got.policyVersion, PolicyFromServer); err != nil {
			a.log.Error("cannot apply the mTLS policy from the server; the last good Envoy configuration stays",
				"err", err, "policy", got.policy.String(), "version", got.policyVersion)
			errs = append(errs, err)
			if isWriteError(err) {
				retry = err
			}
		}
	}
	return errors.Join(errs...), retry
}

// upstream is what a response from the server carries.
type upstream struct {
	roots         []*x509.Certificate
	policy        *policy.Policy
	policyVersion string
}

// errBadPolicy is wrapped by parseResponse's refusal of a response whose
// policy does not parse.
var errBadPolicy = errors.New("bad mTLS policy")

// parseResponse decodes a response to the agent's subscription. It
// refuses the whole response when any of it is malformed, and a response
// with none of the resources asked for.
func parseResponse(resp *discoveryv3.DiscoveryResponse) (upstream, error) {
	var got upstream
	for _, res := range resp.GetResources() {
		if res.GetTypeUrl() != sds.TypeURL {
			return upstream{}, fmt.Errorf("resource of type %q, want %s", res.GetTypeUrl(), sds.TypeURL)
		}
		sec := &tlsv3.Secret{}
		if err := res.UnmarshalTo(sec); err != nil {
			return upstream{}, fmt.Errorf("decode secret: %w", err)
		}
		switch sec.GetName() {
		case sds.RootsName:
			roots, err := parseBundle(sec)
			if err != nil {
				return upstream{}, err
			}
			got.roots = roots
		case sds.PolicyName:
			p, v, err := parsePolicy(sec)
			if err != nil {
				return upstream{}, fmt.Errorf("%w: %w", errBadPolicy, err)
			}
			got.policy, got.policyVersion = &p, v
		}
	}
	if got.roots == nil && got.policy == nil {
		return upstream{}, fmt.Errorf("response without the %q or %q secret", sds.RootsName, sds.PolicyName)
	}
	return got, nil
}

// awaitProxies waits until every local stream subscribed to ROOTCA has
// ACKed the trust bundle the agent serves, or one of them rejected it,
// which it returns. The server counts the agent's ACK as every proxy behind
// it trusting the bundle, and a root rotation acts on that count. With no
// such stream it returns at once: a proxy that connects later is handed the
// bundle before anything else.
func (a *Agent) awaitProxies(ctx context.Context) error {
	for {
		changed := a.sds.AckChanged()
		// The bundle served now: the one just applied, plus any root a
		// certificate response added meanwhile, which the proxies are sent
		// too.
		a.mu.Lock()
		want := fingerprints(a.roots)
		a.mu.Unlock()
		done, err := proxiesAcked(a.sds.Status(), want)
		if done {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}

// proxiesAcked reports whether every stream watching ROOTCA has answered
// the bundle of roots want: all ACKed it, or one rejected it (err).
func proxiesAcked(streams []sds.StreamStatus, want []string) (done bool, err error) {
	done = true
	for _, s := range streams {
		if !slices.Contains(s.Subscribed, sds.RootsName) || slices.Equal(s.AckedRoots, want) {
			continue
		}
		if slices.Equal(s.RejectedRoots, want) {
			return true, fmt.Errorf("agent: local proxy %q rejected the trust bundle: %s", s.Peer.Node, s.LastNACK)
		}
		done = false
	}
	return done, nil
}

func fingerprints(certs []*x509.Certificate) []string {
	fps := make([]string, len(certs))
	for i, c := range certs {
		fps[i] = ca.Fingerprint(c)
	}
	return fps
}

// parseBundle extracts the roots from the ROOTCA secret. Anything but CA
// certificates is refused: they become trust anchors.
func parseBundle(sec *tlsv3.Secret) ([]*x509.Certificate, error) {
	vc := sec.GetValidationContext()
	if vc == nil {
		return nil, fmt.Errorf("secret %q holds no validation context", sds.RootsName)
	}
	roots, err := ca.ParseCerts(vc.GetTrustedCa().GetInlineBytes())
	if err != nil {
		return nil, fmt.Errorf("secret %q: trusted_ca: %w", sds.RootsName, err)
	}
	for _, r := range roots {
		if !r.BasicConstraintsValid || !r.IsCA {
			return nil, fmt.Errorf("secret %q: certificate %q is not a CA", sds.RootsName, r.Subject)
		}
	}
	return roots, nil
}
