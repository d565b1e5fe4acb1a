package sdstest

import (
	"net"
	"testing"

	"google.golang.org/grpc"
)

// Registrar is an SDS server that registers its services: *sds.Server.
type Registrar interface {
	Register(grpc.ServiceRegistrar)
}

// Serve serves srv on lis in a gRPC server until the test ends, and fails
// the test if serving ends in an error.
func Serve(tb testing.TB, srv Registrar, lis net.Listener, opts ...grpc.ServerOption) {
	tb.Helper()
	gs := grpc.NewServer(opts...)
	srv.Register(gs)
	done := make(chan error, 1)
	go func() { done <- gs.Serve(lis) }()
	tb.Cleanup(func() {
		// Stop, not GracefulStop: SDS streams never end by themselves.
		gs.Stop()
		if err := <-done; err != nil {
			tb.Error(err)
		}
	})
}
