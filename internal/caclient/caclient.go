// Package caclient obtains workload certificates from a meshca server over
// Istio's CA API (istio.v1.auth.IstioCertificateService/CreateCertificate).
//
// It is the code path behind `meshca cert` and the meshca agent. The private
// key is generated in this process and never leaves it: only a CSR travels to
// the server. The CSR carries no identity; the server derives the SPIFFE ID
// from the bearer token alone, so a client cannot ask for a name it was not
// granted.
//
// Nothing the server returns is taken on faith. The issued chain is verified
// against the trust bundle the client was configured with, never against the
// root the server sent along with it, because a server cannot vouch for
// itself.
package caclient

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/keystore"
)

// DefaultTimeout bounds one CreateCertificate call when Config.Timeout is
// zero. Signing is fast; a call that takes longer is stuck, and the caller
// (a CLI or an agent with its own retry loop) is better off failing.
const DefaultTimeout = 10 * time.Second

// gRPC metadata keys, as Istio's agent sends them. gRPC lowercases keys on
// the wire, so Istio's "ClusterID" arrives as "clusterid" either way.
const (
	authorizationKey = "authorization"
	clusterIDKey     = "clusterid"
)

var (
	// ErrUntrustedChain reports a certificate chain from the server that does
	// not verify against the configured trust bundle, or that does not
	// certify the key this client generated. Such a response must never be
	// used, whatever else it contains.
	ErrUntrustedChain = errors.New("caclient: untrusted certificate chain")
	// ErrMalformedChain reports a response whose cert_chain breaks the
	// protocol: empty, a single element, or an element that is not exactly
	// one PEM certificate.
	ErrMalformedChain = errors.New("caclient: malformed certificate chain")
)

// Config configures a Client.
type Config struct {
	// Address is the server's gRPC target, e.g. "meshca.example:15012".
	Address string
	// TrustBundle holds the mesh roots. They authenticate the server's TLS
	// certificate (which the mesh CA issues to itself) and verify every
	// chain the server issues.
	TrustBundle []*x509.Certificate
	// ServerName overrides the name checked against the server's
	// certificate (and sent as SNI); empty means the host in Address.
	ServerName string
	// ClusterID, when set, is sent as the "clusterid" metadata, as Istio's
	// agent does, so a multi-cluster server can pick the right token
	// reviewer.
	ClusterID string
	// Timeout bounds each call; zero means DefaultTimeout.
	Timeout time.Duration
	// DialOptions are appended to the client's own options (tests use them
	// to inject dialers or interceptors).
	DialOptions []grpc.DialOption
}

// Client talks to one meshca server. It is safe for concurrent use.
type Client struct {
	cfg  Config
	conn *grpc.ClientConn
	rpc  pb.IstioCertificateServiceClient
}

// New validates cfg and prepares a client. It performs no I/O: the
// connection is made on the first Fetch, so a CLI can build a client before
// it knows whether it will need one.
func New(cfg Config) (*Client, error) {
	if cfg.Address == "" {
		return nil, errors.New("caclient: no server address")
	}
	if len(cfg.TrustBundle) == 0 {
		// Without roots there is nothing to authenticate the server or the
		// issued chain against; refusing beats falling back to system roots.
		return nil, errors.New("caclient: empty trust bundle")
	}
	for i, c := range cfg.TrustBundle {
		if c == nil {
			return nil, fmt.Errorf("caclient: trust bundle entry %d is nil", i)
		}
	}
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("caclient: negative timeout %s", cfg.Timeout)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	// Copy the slices so later changes by the caller cannot alter what this
	// client trusts.
	cfg.TrustBundle = append([]*x509.Certificate(nil), cfg.TrustBundle...)
	cfg.DialOptions = append([]grpc.DialOption(nil), cfg.DialOptions...)

	pool := x509.NewCertPool()
	for _, c := range cfg.TrustBundle {
		pool.AddCert(c)
	}
	tlsCfg := &tls.Config{
		RootCAs:    pool,
		ServerName: cfg.ServerName,
		MinVersion: tls.VersionTLS12,
	}
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg))}, cfg.DialOptions...)
	conn, err := grpc.NewClient(cfg.Address, opts...)
	if err != nil {
		return nil, fmt.Errorf("caclient: %w", err)
	}
	return &Client{cfg: cfg, conn: conn, rpc: pb.NewIstioCertificateServiceClient(conn)}, nil
}

// Close releases the connection.
func (c *Client) Close() error {
	return c.conn.Close()
}

// Request describes the certificate to fetch.
type Request struct {
	// Token authenticates the caller; the server derives the SPIFFE ID
	// from it. Required.
	Token string
	// KeyType is the algorithm of the locally generated key; empty means
	// keystore.ECDSAP256.
	KeyType keystore.KeyType
	// TTL is the requested lifetime, rounded up to whole seconds; zero
	// leaves it to the server. The server may grant less.
	TTL time.Duration
}

// Fetch generates a key, has the server certify it and verifies the result.
//
// Errors returned by the server wrap its gRPC status, so status.Code(err)
// reports the server's code. A chain that fails verification yields an error
// matching ErrUntrustedChain; a chain that breaks the protocol one matching
// ErrMalformedChain.
func (c *Client) Fetch(ctx context.Context, req Request) (*Credentials, error) {
	if req.Token == "" {
		return nil, errors.New("caclient: no token: the server derives the identity from it")
	}
	if req.TTL < 0 {
		return nil, fmt.Errorf("caclient: negative TTL %s", req.TTL)
	}
	kt := req.KeyType
	if kt == "" {
		kt = keystore.ECDSAP256
	}
	key, err := keystore.Generate(kt)
	if err != nil {
		return nil, fmt.Errorf("caclient: generate key: %w", err)
	}
	csrPEM, err := NewCSR(key)
	if err != nil {
		return nil, err
	}

	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	md := []string{authorizationKey, "Bearer " + req.Token}
	if c.cfg.ClusterID != "" {
		md = append(md, clusterIDKey, c.cfg.ClusterID)
	}
	ctx = metadata.AppendToOutgoingContext(ctx, md...)
	resp, err := c.rpc.CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr:              string(csrPEM),
		ValidityDuration: int64((req.TTL + time.Second - 1) / time.Second),
	})
	if err != nil {
		// %w keeps the status reachable: grpc's status.FromError and
		// status.Code look through wrapping with errors.As.
		return nil, fmt.Errorf("caclient: CreateCertificate at %s: %w", c.cfg.Address, err)
	}
	creds, err := Verify(resp.GetCertChain(), key.Public(), c.cfg.TrustBundle)
	if err != nil {
		return nil, err
	}
	creds.Key = key
	return creds, nil
}

// NewCSR returns, in PEM, the CSR Fetch sends for key. Its template is
// empty: the identity comes from the token, and the server refuses CSRs
// that ask for names anyway.
func NewCSR(key crypto.Signer) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, fmt.Errorf("caclient: create CSR: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// Verify checks a CreateCertificate response's cert_chain as Fetch does: it
// must verify against bundle, never against the root the server sent, and
// certify pub. It returns the credentials without their Key, or an error
// matching ErrMalformedChain or ErrUntrustedChain. The served root joins
// Roots on the strength of a server that bundle authenticated.
func Verify(elems []string, pub crypto.PublicKey, bundle []*x509.Certificate) (*Credentials, error) {
	switch len(elems) {
	case 0:
		return nil, fmt.Errorf("%w: server returned no certificates", ErrMalformedChain)
	case 1:
		// Istio's protocol always appends the root; a lone element means
		// the server is not speaking it, and guessing which role the
		// certificate plays would be unsafe.
		return nil, fmt.Errorf("%w: server returned a single certificate; want leaf, intermediates and root", ErrMalformedChain)
	}
	certs := make([]*x509.Certificate, len(elems))
	for i, e := range elems {
		parsed, err := ca.ParseCerts([]byte(e))
		if err != nil {
			return nil, fmt.Errorf("%w: element %d: %v", ErrMalformedChain, i, err)
		}
		if len(parsed) != 1 {
			return nil, fmt.Errorf("%w: element %d holds %d certificates, want exactly one", ErrMalformedChain, i, len(parsed))
		}
		certs[i] = parsed[0]
	}
	chain, served := certs[:len(certs)-1], certs[len(certs)-1]

	// The bundle is ours, labelled with the leaf's trust domain: the
	// configured roots are the mesh's, and the leaf names the domain. The
	// served root is deliberately left out.
	leafID, err := x509svid.IDFromCert(chain[0])
	if err != nil {
		return nil, fmt.Errorf("%w: leaf: %v", ErrUntrustedChain, err)
	}
	id, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(leafID.TrustDomain(), bundle))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUntrustedChain, err)
	}
	if !publicKeyEqual(pub, chain[0].PublicKey) {
		return nil, fmt.Errorf("%w: leaf certificate does not certify the generated key", ErrUntrustedChain)
	}

	roots := slices.Clone(bundle)
	if !containsCert(roots, served) {
		// A root we do not yet trust is accepted into the written bundle
		// only because the server is already authenticated by our bundle
		// (that is how a root rotation reaches workloads). It still has to
		// look like a root, so a confused server cannot plant a leaf or a
		// garbage certificate as a trust anchor.
		if err := checkRoot(served); err != nil {
			return nil, fmt.Errorf("%w: last element: %v", ErrMalformedChain, err)
		}
		roots = append(roots, served)
	}

	notAfter := chain[0].NotAfter
	for _, cert := range chain[1:] {
		// The chain is only usable while every certificate in it is valid.
		if cert.NotAfter.Before(notAfter) {
			notAfter = cert.NotAfter
		}
	}
	return &Credentials{
		ID:       id,
		Chain:    slices.Clone(chain),
		Roots:    dedup(roots),
		NotAfter: notAfter,
	}, nil
}

// checkRoot reports whether c is a self-signed CA certificate.
func checkRoot(c *x509.Certificate) error {
	if !c.BasicConstraintsValid || !c.IsCA {
		return fmt.Errorf("certificate %q is not a CA", c.Subject)
	}
	if err := c.CheckSignatureFrom(c); err != nil {
		return fmt.Errorf("certificate %q is not self-signed: %v", c.Subject, err)
	}
	return nil
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	ak, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ak.Equal(b)
}

func containsCert(set []*x509.Certificate, c *x509.Certificate) bool {
	return slices.ContainsFunc(set, c.Equal)
}

// dedup drops repeated certificates, keeping the first occurrence, so a
// bundle configured with duplicates does not grow the written file.
func dedup(certs []*x509.Certificate) []*x509.Certificate {
	out := certs[:0]
	for _, c := range certs {
		if !containsCert(out, c) {
			out = append(out, c)
		}
	}
	return out
}
