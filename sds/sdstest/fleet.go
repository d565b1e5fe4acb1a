package sdstest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// FleetConfig configures a Fleet.
type FleetConfig struct {
	// Target is the SDS server's gRPC target, such as "unix:///run/sds.sock".
	Target string
	// DialOptions default to plaintext, for a Unix socket.
	DialOptions []grpc.DialOption
	// Streams is how many proxies to stand in for.
	Streams int
	// StreamsPerConn puts that many streams on each connection; default 1,
	// as each Envoy has its own connection.
	StreamsPerConn int
	// Delta selects the incremental protocol.
	Delta bool
	// Names default to "default" and "ROOTCA".
	Names []string
}

// Fleet is many SDS streams that subscribe and ACK every response without
// looking inside: the cheapest stand-in for a fleet of Envoys, for load
// tests. Unlike Client it keeps no state.
type Fleet struct {
	conns  []*grpc.ClientConn
	cancel context.CancelFunc
	wg     sync.WaitGroup
	acks   atomic.Int64 // responses ACKed, over all streams

	mu  sync.Mutex
	err error
}

// maxOpening bounds the streams being opened at once.
const maxOpening = 64

// StartFleet opens the streams and returns once each has sent its first
// request.
func StartFleet(ctx context.Context, cfg FleetConfig) (*Fleet, error) {
	if cfg.Streams <= 0 {
		return nil, errors.New("sdstest: a fleet needs streams")
	}
	if cfg.StreamsPerConn <= 0 {
		cfg.StreamsPerConn = 1
	}
	if cfg.DialOptions == nil {
		cfg.DialOptions = []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	if cfg.Names == nil {
		cfg.Names = []string{"default", "ROOTCA"}
	}
	ctx, cancel := context.WithCancel(ctx)
	f := &Fleet{cancel: cancel}
	for i := 0; i < cfg.Streams; i += cfg.StreamsPerConn {
		conn, err := grpc.NewClient(cfg.Target, cfg.DialOptions...)
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("sdstest: %w", err)
		}
		f.conns = append(f.conns, conn)
	}
	opening := make(chan struct{}, maxOpening)
	var started sync.WaitGroup
	for i := range cfg.Streams {
		rpc := secretv3.NewSecretDiscoveryServiceClient(f.conns[i/cfg.StreamsPerConn])
		node := &corev3.Node{Id: fmt.Sprintf("fleet-%d", i)}
		started.Add(1)
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			opening <- struct{}{}
			opened := sync.OnceFunc(func() { <-opening; started.Done() })
			// A stream only ends in error; after Close, that is expected.
			if err := f.runStream(ctx, rpc, cfg, node, opened); ctx.Err() == nil {
				f.fail(err)
			}
			opened() // after fail, so StartFleet sees the failure
		}()
	}
	started.Wait()
	if err := f.Err(); err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}

// runStream calls opened once its first request is sent, then ACKs until
// the stream fails.
func (f *Fleet) runStream(ctx context.Context, rpc secretv3.SecretDiscoveryServiceClient, cfg FleetConfig, node *corev3.Node, opened func()) error {
	if cfg.Delta {
		s, err := rpc.DeltaSecrets(ctx)
		if err != nil {
			return err
		}
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: TypeURL, ResourceNamesSubscribe: cfg.Names}); err != nil {
			return err
		}
		opened()
		for {
			resp, err := s.Recv()
			if err != nil {
				return err
			}
			if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: TypeURL, ResponseNonce: resp.GetNonce()}); err != nil {
				return err
			}
			f.acks.Add(1)
		}
	}
	s, err := rpc.StreamSecrets(ctx)
	if err != nil {
		return err
	}
	if err := s.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: TypeURL, ResourceNames: cfg.Names}); err != nil {
		return err
	}
	opened()
	for {
		resp, err := s.Recv()
		if err != nil {
			return err
		}
		if err := s.Send(&discoveryv3.DiscoveryRequest{TypeUrl: TypeURL, ResourceNames: cfg.Names,
			VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
			return err
		}
		f.acks.Add(1)
	}
}

func (f *Fleet) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err == nil {
		f.err = fmt.Errorf("sdstest: fleet stream: %w", err)
	}
}

// Acks returns how many responses the fleet has ACKed, over all streams.
func (f *Fleet) Acks() int64 { return f.acks.Load() }

// Err returns the first stream failure, if any.
func (f *Fleet) Err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// Close ends every stream and connection and returns the first stream
// failure.
func (f *Fleet) Close() error {
	f.cancel()
	f.wg.Wait()
	for _, c := range f.conns {
		_ = c.Close()
	}
	err := f.Err()
	if status.Code(err) == codes.Canceled {
		return nil
	}
	return err
}
