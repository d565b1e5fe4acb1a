package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"slices"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/sds"
)

// followBundle keeps a ROOTCA subscription open on the server's SDS
// service, so a new trust bundle reaches the proxy as soon as the server
// has it rather than at the next renewal. Each bundle is ACKed to the
// server only once the local proxies have ACKed it, and NACKed if one of
// them rejects it. It reconnects with backoff until ctx ends.
func (a *Agent) followBundle(ctx context.Context) {
	failures := 0
	for {
		began := a.clock.Now()
		received, err := a.streamBundle(ctx)
		if ctx.Err() != nil {
			return
		}
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

// streamBundle runs one stream, on a connection of its own that trusts the
// current roots, until it breaks. received reports whether the server
// answered at all.
func (a *Agent) streamBundle(ctx context.Context) (received bool, err error) {
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
	// No version_info, unlike a reconnecting Envoy: the server then sends
	// its bundle on every new stream, and it replaces whatever the agent
	// pieced together meanwhile.
	err = stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: a.node}, TypeUrl: sds.TypeURL,
		ResourceNames: []string{sds.RootsName}})
	var version string // of the last bundle applied
	for err == nil || errors.Is(err, io.EOF) {
		// A failed Send says only io.EOF; Recv has the stream's status.
		var resp *discoveryv3.DiscoveryResponse
		if resp, err = stream.Recv(); err != nil {
			break
		}
		received = true
		ack := &discoveryv3.DiscoveryRequest{TypeUrl: sds.TypeURL, ResourceNames: []string{sds.RootsName},
			ResponseNonce: resp.GetNonce()}
		if bundle, perr := parseBundle(resp); perr != nil {
			// NACK: echo the version still in use, as Envoy does.
			ack.VersionInfo = version
			ack.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: perr.Error()}
			a.log.Warn("rejected a trust bundle from the server; keeping the current one", "err", perr)
		} else {
			a.mu.Lock()
			a.setRoots(bundle, "server ROOTCA stream")
			a.pending = fingerprints(bundle)
			a.mu.Unlock()
			perr := a.awaitProxies(ctx)
			a.mu.Lock()
			a.pending = nil
			a.mu.Unlock()
			if ctx.Err() != nil {
				err = ctx.Err()
				break
			}
			if perr != nil {
				ack.VersionInfo = version
				ack.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: perr.Error()}
				a.log.Warn("a local proxy rejected the trust bundle; rejecting it upstream", "err", perr)
			} else {
				version = resp.GetVersionInfo()
				ack.VersionInfo = version
			}
		}
		err = stream.Send(ack)
	}
	return received, fmt.Errorf("agent: trust bundle stream: %w", err)
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

// parseBundle extracts the roots from a response to a ROOTCA subscription.
// Anything but CA certificates is refused: they become trust anchors.
func parseBundle(resp *discoveryv3.DiscoveryResponse) ([]*x509.Certificate, error) {
	for _, res := range resp.GetResources() {
		if res.GetTypeUrl() != sds.TypeURL {
			return nil, fmt.Errorf("resource of type %q, want %s", res.GetTypeUrl(), sds.TypeURL)
		}
		sec := &tlsv3.Secret{}
		if err := res.UnmarshalTo(sec); err != nil {
			return nil, fmt.Errorf("decode secret: %w", err)
		}
		if sec.GetName() != sds.RootsName {
			continue
		}
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
	return nil, fmt.Errorf("response without the %q secret", sds.RootsName)
}
