// Package sdstest is an SDS client that behaves as Envoy does, for tests of
// meshca's SDS server and for load generation (Fleet).
//
// Like Envoy, a Client opens one stream per resource type on its
// connection, sends its node and resource names on the first request of
// each stream, ACKs a response by echoing its version_info (state of the
// world) and nonce, NACKs with error_detail when a secret does not decode,
// when its key does not match its chain, when the mTLS policy
// ("meshca-mtls-policy", which node agents ask for) does not parse, or when
// the Reject hook says so,
// keeping what it had; and on a new stream resubscribes, naming what it
// has: the last ACKed version_info (state of the world) or
// initial_resource_versions (delta).
//
// Where it differs from Envoy:
//
//   - It does not reconnect by itself: call Connect again, where Envoy
//     retries with backoff.
//   - It puts all its names on one stream. Envoy without ADS gives each
//     secret its own subscription, usually its own stream; the protocol
//     allows both.
//   - Its node carries only an ID; Envoy also sends cluster, locality,
//     metadata and build information.
//   - It has no initial-fetch timeout and no warming: secrets are usable as
//     soon as they arrive.
//   - It validates less: a TLS key pair that loads is accepted; Envoy also
//     applies its own certificate and key policy.
package sdstest

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshca/meshca/internal/policy"
)

// TypeURL is the type of SDS resources.
const TypeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// PolicyName is the name of the mTLS policy resource (sds.PolicyName).
const PolicyName = "meshca-mtls-policy"

// Config configures a Client.
type Config struct {
	// Conn is the connection to the SDS server.
	Conn grpc.ClientConnInterface
	// Node is the node ID sent on the first request of each stream.
	Node string
	// Names are the secrets to subscribe to; nil means "default" and
	// "ROOTCA".
	Names []string
	// Delta selects the incremental protocol (DeltaSecrets) instead of
	// state of the world (StreamSecrets).
	Delta bool
	// Reject, if set, sees every secret received; an error NACKs the
	// response with that error's text.
	Reject func(*tlsv3.Secret) error
	// Metadata goes with every RPC, for example the bearer token.
	Metadata metadata.MD
	// Hold, if set, is called with every response before the client
	// applies and answers it; the answer waits until Hold returns. A test
	// holds an ACK back this way to see what waits for it. ctx ends with
	// the stream.
	Hold func(ctx context.Context, r Response)
}

// Secret is a secret the client holds.
type Secret struct {
	// Version is the resource version (delta) or the version_info of the
	// response that carried it (state of the world).
	Version string
	Secret  *tlsv3.Secret
	digest  [32]byte
}

// Response is a response the client received.
type Response struct {
	Stream  int    // which stream, counting from 1
	Nonce   string // the response's nonce
	Version string // version_info, or delta's system_version_info
	// Names are the secrets it carried and, for delta, their versions in
	// Versions; Removed are the names delta reported removed.
	Names    []string
	Versions []string
	Removed  []string
	// Secrets are the secrets it carried that decoded.
	Secrets []*tlsv3.Secret
	// NACK is the error the client rejected it with; empty for an ACK.
	NACK string
}

// State is what the client has and has seen.
type State struct {
	Connected bool
	// Err is why the last stream ended; nil while connected or when the
	// client ended it.
	Err error
	// Streams counts streams opened.
	Streams int
	// Secrets are the secrets held (ACKed), by name.
	Secrets map[string]Secret
	// Version is the version_info of the last ACKed state-of-the-world
	// response, sent again on reconnect.
	Version string
	// Responses lists every response, oldest first.
	Responses []Response
	// Duplicates counts secrets received with exactly the content already
	// held: pushes the proxy did not need.
	Duplicates int
}

// OnStream returns the responses received on stream n.
func (s State) OnStream(n int) []Response {
	var out []Response
	for _, r := range s.Responses {
		if r.Stream == n {
			out = append(out, r)
		}
	}
	return out
}

// Client is one proxy's SDS client.
type Client struct {
	cfg Config
	rpc secretv3.SecretDiscoveryServiceClient

	mu      sync.Mutex // held across Send, so requests go out one at a time
	changed chan struct{}
	names   []string
	st      State
	cur     *stream
}

type stream struct {
	n      int
	ctx    context.Context // ends when the client ends the stream
	cancel context.CancelFunc
	done   chan struct{}
	sotw   grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	delta  grpc.BidiStreamingClient[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]
	nonce  string // of the last response
}

// New returns a client; it connects on Connect.
func New(cfg Config) *Client {
	names := cfg.Names
	if names == nil {
		names = []string{"default", "ROOTCA"}
	}
	return &Client{
		cfg:     cfg,
		rpc:     secretv3.NewSecretDiscoveryServiceClient(cfg.Conn),
		changed: make(chan struct{}),
		names:   slices.Clone(names),
		st:      State{Secrets: make(map[string]Secret)},
	}
}

func (c *Client) outgoing(ctx context.Context) context.Context {
	if c.cfg.Metadata != nil {
		return metadata.NewOutgoingContext(ctx, c.cfg.Metadata)
	}
	return ctx
}

// Connect opens a stream and subscribes. Responses are handled, and ACKed
// or NACKed, in the background until ctx ends, Disconnect is called or the
// server ends the stream.
func (c *Client) Connect(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur != nil {
		return errors.New("sdstest: already connected")
	}
	sctx, cancel := context.WithCancel(c.outgoing(ctx))
	s := &stream{n: c.st.Streams + 1, ctx: sctx, cancel: cancel, done: make(chan struct{})}
	node := &corev3.Node{Id: c.cfg.Node}
	var err error
	if c.cfg.Delta {
		if s.delta, err = c.rpc.DeltaSecrets(sctx); err == nil {
			req := &discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: TypeURL,
				ResourceNamesSubscribe: slices.Clone(c.names)}
			for _, n := range c.names {
				if sec, ok := c.st.Secrets[n]; ok {
					if req.InitialResourceVersions == nil {
						req.InitialResourceVersions = make(map[string]string)
					}
					req.InitialResourceVersions[n] = sec.Version
				}
			}
			err = s.delta.Send(req)
		}
	} else {
		if s.sotw, err = c.rpc.StreamSecrets(sctx); err == nil {
			err = s.sotw.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: TypeURL,
				ResourceNames: slices.Clone(c.names), VersionInfo: c.st.Version})
		}
	}
	// A Send fails with io.EOF when the server has already ended the
	// stream (refused it, say); receive reads the status.
	if err != nil && !errors.Is(err, io.EOF) {
		cancel()
		return fmt.Errorf("sdstest: open stream: %w", err)
	}
	c.cur = s
	c.st.Streams, c.st.Connected, c.st.Err = s.n, true, nil
	c.notify()
	go c.receive(s)
	return nil
}

// Disconnect ends the current stream, if any, and waits until it is gone
// on this side.
func (c *Client) Disconnect() {
	c.mu.Lock()
	s := c.cur
	c.mu.Unlock()
	if s == nil {
		return
	}
	s.cancel()
	<-s.done
}

func (c *Client) receive(s *stream) {
	defer close(s.done)
	var err error
	for err == nil {
		var sendErr error
		if s.delta != nil {
			var resp *discoveryv3.DeltaDiscoveryResponse
			if resp, err = s.delta.Recv(); err == nil {
				sendErr = c.handleDelta(s, resp)
			}
		} else {
			var resp *discoveryv3.DiscoveryResponse
			if resp, err = s.sotw.Recv(); err == nil {
				sendErr = c.handleSotw(s, resp)
			}
		}
		// A failed Send says only io.EOF; the next Recv has the status.
		if sendErr != nil && !errors.Is(sendErr, io.EOF) {
			err = sendErr
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == s {
		c.cur = nil
		c.st.Connected = false
		if s.ctx.Err() == nil {
			c.st.Err = err
		}
		c.notify()
	}
	s.cancel()
}

type received struct {
	name, version string
	secret        *tlsv3.Secret
	digest        [32]byte
}

func (c *Client) handleSotw(s *stream, resp *discoveryv3.DiscoveryResponse) error {
	var got []received
	var bad error
	for _, a := range resp.GetResources() {
		sec, digest, err := c.decode(a)
		if err != nil {
			bad = errors.Join(bad, err)
			continue
		}
		got = append(got, received{name: sec.GetName(), version: resp.GetVersionInfo(), secret: sec, digest: digest})
	}
	r := c.hold(s, resp.GetNonce(), resp.GetVersionInfo(), got, nil, bad)
	c.mu.Lock()
	defer c.mu.Unlock()
	s.nonce = resp.GetNonce()
	c.st.Responses = append(c.st.Responses, r)
	if bad == nil {
		c.apply(got, nil)
		c.st.Version = resp.GetVersionInfo()
	}
	// An ACK names the version applied; a NACK the one still in use.
	req := &discoveryv3.DiscoveryRequest{TypeUrl: TypeURL, ResourceNames: slices.Clone(c.names),
		VersionInfo: c.st.Version, ResponseNonce: resp.GetNonce()}
	if bad != nil {
		req.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: r.NACK}
	}
	c.notify()
	return s.sotw.Send(req)
}

func (c *Client) handleDelta(s *stream, resp *discoveryv3.DeltaDiscoveryResponse) error {
	var got []received
	var bad error
	for _, res := range resp.GetResources() {
		sec, digest, err := c.decode(res.GetResource())
		if err == nil && sec.GetName() != res.GetName() {
			err = fmt.Errorf("resource %q holds secret %q", res.GetName(), sec.GetName())
		}
		if err != nil {
			bad = errors.Join(bad, err)
			continue
		}
		got = append(got, received{name: res.GetName(), version: res.GetVersion(), secret: sec, digest: digest})
	}
	r := c.hold(s, resp.GetNonce(), resp.GetSystemVersionInfo(), got, resp.GetRemovedResources(), bad)
	c.mu.Lock()
	defer c.mu.Unlock()
	s.nonce = resp.GetNonce()
	c.st.Responses = append(c.st.Responses, r)
	if bad == nil {
		c.apply(got, resp.GetRemovedResources())
	}
	req := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: TypeURL, ResponseNonce: resp.GetNonce()}
	if bad != nil {
		req.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: r.NACK}
	}
	c.notify()
	return s.delta.Send(req)
}

// decode unpacks a secret and checks it as a proxy would before using it.
func (c *Client) decode(a *anypb.Any) (*tlsv3.Secret, [32]byte, error) {
	var digest [32]byte
	if a.GetTypeUrl() != TypeURL {
		return nil, digest, fmt.Errorf("resource of type %q, want %s", a.GetTypeUrl(), TypeURL)
	}
	sec := &tlsv3.Secret{}
	if err := a.UnmarshalTo(sec); err != nil {
		return nil, digest, fmt.Errorf("decode secret: %w", err)
	}
	if tc := sec.GetTlsCertificate(); tc != nil {
		if _, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes()); err != nil {
			return nil, digest, fmt.Errorf("secret %q: %w", sec.GetName(), err)
		}
	}
	if vc := sec.GetValidationContext(); vc != nil {
		if !x509.NewCertPool().AppendCertsFromPEM(vc.GetTrustedCa().GetInlineBytes()) {
			return nil, digest, fmt.Errorf("secret %q: no certificates in trusted_ca", sec.GetName())
		}
	}
	if sec.GetName() == PolicyName {
		if _, err := parsePolicy(sec); err != nil {
			return nil, digest, err
		}
	}
	if c.cfg.Reject != nil {
		if err := c.cfg.Reject(sec); err != nil {
			return nil, digest, err
		}
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(sec)
	if err != nil {
		return nil, digest, fmt.Errorf("secret %q: %w", sec.GetName(), err)
	}
	return sec, sha256.Sum256(b), nil
}

// hold describes a response and passes it to Config.Hold, if any, before
// the client acts on it.
func (c *Client) hold(s *stream, nonce, version string, got []received, removed []string, bad error) Response {
	r := Response{Stream: s.n, Nonce: nonce, Version: version, Removed: slices.Clone(removed)}
	for _, g := range got {
		r.Names = append(r.Names, g.name)
		r.Versions = append(r.Versions, g.version)
		r.Secrets = append(r.Secrets, g.secret)
	}
	if bad != nil {
		r.NACK = bad.Error()
	}
	if c.cfg.Hold != nil {
		c.cfg.Hold(s.ctx, r)
	}
	return r
}

func (c *Client) apply(got []received, removed []string) {
	for _, g := range got {
		if old, ok := c.st.Secrets[g.name]; ok && old.digest == g.digest {
			c.st.Duplicates++
		}
		c.st.Secrets[g.name] = Secret{Version: g.version, Secret: g.secret, digest: g.digest}
	}
	for _, n := range removed {
		delete(c.st.Secrets, n)
	}
}

// notify wakes Wait; c.mu is held.
func (c *Client) notify() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// Subscribe adds names to the subscription.
func (c *Client) Subscribe(names ...string) error { return c.resubscribe(names, nil) }

// Unsubscribe removes names from the subscription.
func (c *Client) Unsubscribe(names ...string) error { return c.resubscribe(nil, names) }

func (c *Client) resubscribe(add, drop []string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range add {
		if !slices.Contains(c.names, n) {
			c.names = append(c.names, n)
		}
	}
	c.names = slices.DeleteFunc(c.names, func(n string) bool { return slices.Contains(drop, n) })
	for _, n := range drop {
		delete(c.st.Secrets, n)
	}
	s := c.cur
	if s == nil {
		return nil
	}
	if s.delta != nil {
		return s.delta.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: TypeURL,
			ResourceNamesSubscribe: add, ResourceNamesUnsubscribe: drop})
	}
	return s.sotw.Send(&discoveryv3.DiscoveryRequest{TypeUrl: TypeURL, ResourceNames: slices.Clone(c.names),
		VersionInfo: c.st.Version, ResponseNonce: s.nonce})
}

// State returns a copy of the client's state.
func (c *Client) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.copyState()
}

func (c *Client) copyState() State {
	s := c.st
	s.Secrets = make(map[string]Secret, len(c.st.Secrets))
	for n, sec := range c.st.Secrets {
		s.Secrets[n] = sec
	}
	s.Responses = slices.Clone(c.st.Responses)
	return s
}

// Wait blocks until cond holds for the client's state, or ctx ends.
func (c *Client) Wait(ctx context.Context, cond func(State) bool) (State, error) {
	for {
		c.mu.Lock()
		s, ch := c.copyState(), c.changed
		c.mu.Unlock()
		if cond(s) {
			return s, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return s, fmt.Errorf("sdstest: %s: condition not met: %w (connected %v, err %v, %d responses, secrets %v)",
				c.cfg.Node, ctx.Err(), s.Connected, s.Err, len(s.Responses), secretVersions(s))
		}
	}
}

func secretVersions(s State) map[string]string {
	m := make(map[string]string, len(s.Secrets))
	for n, sec := range s.Secrets {
		m[n] = sec.Version
	}
	return m
}

// Policy returns the mTLS policy held, if any.
func (s State) Policy() (policy.Policy, bool) {
	sec, ok := s.Secrets[PolicyName]
	if !ok {
		return policy.Policy{}, false
	}
	p, err := parsePolicy(sec.Secret)
	return p, err == nil // decode checked it
}

func parsePolicy(sec *tlsv3.Secret) (policy.Policy, error) {
	g := sec.GetGenericSecret()
	if g == nil {
		return policy.Policy{}, fmt.Errorf("secret %q is not a generic secret", sec.GetName())
	}
	p, err := policy.ParseJSON(g.GetSecret().GetInlineBytes())
	if err != nil {
		return policy.Policy{}, fmt.Errorf("secret %q: %w", sec.GetName(), err)
	}
	return p, nil
}

// Has reports whether the state holds every named secret.
func (s State) Has(names ...string) bool {
	for _, n := range names {
		if _, ok := s.Secrets[n]; !ok {
			return false
		}
	}
	return true
}

// Fetch asks once, with FetchSecrets, for the client's names and holds what
// comes back as if ACKed.
func (c *Client) Fetch(ctx context.Context) error {
	c.mu.Lock()
	req := &discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: c.cfg.Node}, TypeUrl: TypeURL,
		ResourceNames: slices.Clone(c.names), VersionInfo: c.st.Version}
	c.mu.Unlock()
	resp, err := c.rpc.FetchSecrets(c.outgoing(ctx), req)
	if err != nil {
		return err
	}
	var got []received
	for _, a := range resp.GetResources() {
		sec, digest, err := c.decode(a)
		if err != nil {
			return fmt.Errorf("sdstest: fetch: %w", err)
		}
		got = append(got, received{name: sec.GetName(), version: resp.GetVersionInfo(), secret: sec, digest: digest})
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.apply(got, nil)
	c.st.Version = resp.GetVersionInfo()
	c.notify()
	return nil
}
