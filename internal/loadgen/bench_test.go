package loadgen_test

// End-to-end benchmarks: the gRPC CreateCertificate round trip over real TLS
// on loopback, against the real server (internal/server and certservice in
// front of a self-managed CA on an in-memory keystore, with the development
// token authenticator). The client and the server share the machine's
// cores, so ns/op is the cost of both.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"

	"github.com/meshca/meshca/internal/benchtest"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/internal/loadgen"
)

// startServer starts an in-process server (a few milliseconds: two key
// generations, two signatures and two listeners) and a token for it.
func startServer(b *testing.B, opts loadgen.ServerOptions) (*loadgen.Server, string) {
	b.Helper()
	srv, err := loadgen.StartServer(b.Context(), opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := srv.Close(); err != nil {
			b.Error(err)
		}
	})
	tok, err := srv.MintToken(time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	return srv, tok
}

// BenchmarkCreateCertificateRPC calls the Istio client stub with a
// pre-built CSR and token: the CA's cost plus TLS and gRPC on both ends,
// without client key generation or client-side verification. "parallel"
// shares one connection among GOMAXPROCS goroutines, as gRPC multiplexes.
func BenchmarkCreateCertificateRPC(b *testing.B) {
	b.Run("ledger=off", func(b *testing.B) { benchmarkCreateCertificateRPC(b, loadgen.ServerOptions{}) })
	b.Run("ledger=on", func(b *testing.B) { benchmarkCreateCertificateRPC(b, loadgen.ServerOptions{Audit: true}) })
}

func benchmarkCreateCertificateRPC(b *testing.B, opts loadgen.ServerOptions) {
	srv, tok := startServer(b, opts)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		b.Fatal(err)
	}
	csr := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	roots := x509.NewCertPool()
	for _, c := range srv.TrustBundle() {
		roots.AddCert(c)
	}
	conn, err := grpc.NewClient(srv.Addr(), grpc.WithTransportCredentials(credentials.NewTLS(
		&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12})))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = conn.Close() })
	rpc := pb.NewIstioCertificateServiceClient(conn)
	ctx := metadata.AppendToOutgoingContext(b.Context(), "authorization", "Bearer "+tok)
	call := func(b *testing.B) {
		resp, err := rpc.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr})
		if err != nil {
			b.Error(err)
			return
		}
		if len(resp.GetCertChain()) < 2 {
			b.Errorf("response holds %d certificates", len(resp.GetCertChain()))
		}
	}
	call(b) // connect outside the timed loop: the handshake is not per request

	benchtest.SequentialAndParallel(b, call)
}

// BenchmarkFetch is caclient.Fetch: everything a workload pays for a
// certificate, including generating its key and CSR and verifying the
// returned chain against its trust bundle.
func BenchmarkFetch(b *testing.B) {
	srv, tok := startServer(b, loadgen.ServerOptions{})
	c, err := caclient.New(caclient.Config{Address: srv.Addr(), TrustBundle: srv.TrustBundle()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	ctx := context.Background()
	req := caclient.Request{Token: tok}
	fetch := func(b *testing.B) {
		if _, err := c.Fetch(ctx, req); err != nil {
			b.Error(err)
		}
	}
	fetch(b)

	benchtest.SequentialAndParallel(b, fetch)
}
