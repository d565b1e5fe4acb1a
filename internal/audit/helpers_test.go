package audit_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshca/meshca/internal/audit"
)

// testSigner signs checkpoints with an in-memory key and a self-signed
// certificate, as the CA does with its intermediate.
type testSigner struct {
	key   crypto.Signer
	opts  crypto.SignerOpts
	cert  *x509.Certificate
	fail  atomic.Bool
	calls atomic.Int64
}

func newSigner(tb testing.TB, kind string) *testSigner {
	tb.Helper()
	var (
		key  crypto.Signer
		opts crypto.SignerOpts = crypto.SHA256
		err  error
	)
	switch kind {
	case "ecdsa-p256":
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "ecdsa-p384":
		key, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "rsa-pkcs1":
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	case "rsa-pss":
		key, err = rsa.GenerateKey(rand.Reader, 2048)
		opts = &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}
	case "ed25519":
		_, key, err = ed25519.GenerateKey(rand.Reader)
		opts = crypto.Hash(0)
	default:
		tb.Fatalf("unknown signer kind %q", kind)
	}
	if err != nil {
		tb.Fatal(err)
	}
	return &testSigner{key: key, opts: opts, cert: selfSigned(tb, key, "audit checkpoint signer "+kind)}
}

func selfSigned(tb testing.TB, key crypto.Signer, cn string) *x509.Certificate {
	tb.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:              time.Date(2099, 1, 1, 0, 0, 0, 0, time.UTC),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		tb.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return cert
}

func (s *testSigner) SignCheckpoint(_ context.Context, digest []byte) ([]byte, []*x509.Certificate, error) {
	s.calls.Add(1)
	if s.fail.Load() {
		return nil, nil, errors.New("signer offline")
	}
	sig, err := s.key.Sign(rand.Reader, digest, s.opts)
	if err != nil {
		return nil, nil, err
	}
	return sig, []*x509.Certificate{s.cert}, nil
}

// start opens a ledger and runs its writer until the test ends.
func start(tb testing.TB, cfg audit.Config) *audit.Ledger {
	tb.Helper()
	l, err := audit.New(cfg)
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	run(tb, l)
	return l
}

func run(tb testing.TB, l *audit.Ledger) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, audit.ErrClosed) {
			tb.Errorf("Run: %v", err)
		}
		l.Close()
	})
}

func mustAppend(tb testing.TB, l *audit.Ledger, r audit.Record) audit.Record {
	tb.Helper()
	got, err := l.Append(context.Background(), r)
	if err != nil {
		tb.Fatalf("Append: %v", err)
	}
	return got
}

// tryAppend is mustAppend for goroutines other than the test's.
func tryAppend(tb testing.TB, l *audit.Ledger, r audit.Record) {
	if _, err := l.Append(context.Background(), r); err != nil {
		tb.Errorf("Append: %v", err)
	}
}

// gen returns the i-th record of a deterministic mix of kinds whose id can
// be read back with genID.
func gen(i int) audit.Record {
	switch i % 10 {
	case 7, 8:
		r := audit.Record{
			Kind:   audit.KindDenied,
			Reason: denyReasons[i%len(denyReasons)],
			Detail: fmt.Sprintf("gen-%d", i),
			Peer:   fmt.Sprintf("10.1.%d.%d:%d", i%250, i/250%250, 40000+i%20000),
		}
		if i%3 == 0 {
			r.ClaimedID = genSPIFFEID(i)
		}
		return r
	case 9:
		return audit.Record{Kind: audit.KindAdmin, Actor: "admin@cluster.local", Action: "rotate-root",
			Target: fmt.Sprintf("gen-%d", i), Result: "ok"}
	}
	nb := fixtureStart.Add(time.Duration(i%1000) * time.Minute)
	return audit.Record{
		Kind:              audit.KindIssued,
		Serial:            fmt.Sprintf("%x", i+1),
		SPIFFEID:          genSPIFFEID(i),
		Namespace:         fmt.Sprintf("ns-%d", i%20),
		ServiceAccount:    fmt.Sprintf("sa-%d", i%200),
		PodName:           fmt.Sprintf("app-%d-7f9c8d6b5-x%04d", i%200, i%10000),
		PodUID:            fmt.Sprintf("%08x-0000-4000-8000-%012x", i, i),
		NodeName:          fmt.Sprintf("node-%d", i%30),
		ClusterID:         "cluster-a",
		TokenHash:         fmt.Sprintf("%032x", i*7919),
		KeyFingerprint:    fmt.Sprintf("%064x", i*104729),
		KeyType:           "ecdsa-p256",
		NotBefore:         nb,
		NotAfter:          nb.Add(time.Duration(1+i%24) * time.Hour),
		IssuerFingerprint: fmt.Sprintf("%064x", 0xa11ce),
		RootFingerprint:   genRoots[i%len(genRoots)],
		Peer:              fmt.Sprintf("10.0.%d.%d:%d", i%250, i/250%250, 40000+i%20000),
	}
}

var (
	fixtureStart = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	denyReasons  = []string{"expired-token", "malformed-csr", "wrong-audience", "unknown-pod"}
	genRoots     = []string{fmt.Sprintf("%064x", 1), fmt.Sprintf("%064x", 2), fmt.Sprintf("%064x", 3)}
)

func genSPIFFEID(i int) string {
	return fmt.Sprintf("spiffe://cluster.local/ns/ns-%d/sa/sa-%d", i%20, i%200)
}

// genID recovers i from a record made by gen, or -1.
func genID(r audit.Record) int {
	var i int
	switch r.Kind {
	case audit.KindIssued:
		if _, err := fmt.Sscanf(r.Serial, "%x", &i); err == nil {
			return i - 1
		}
	case audit.KindDenied:
		if _, err := fmt.Sscanf(r.Detail, "gen-%d", &i); err == nil {
			return i
		}
	case audit.KindAdmin:
		if _, err := fmt.Sscanf(r.Target, "gen-%d", &i); err == nil {
			return i
		}
	}
	return -1
}

// all collects a query's records.
func all(tb testing.TB, l *audit.Ledger, f audit.Filter) []audit.Record {
	tb.Helper()
	var out []audit.Record
	for r, err := range l.Query(context.Background(), f) {
		if err != nil {
			tb.Fatalf("Query(%+v): %v", f, err)
		}
		out = append(out, r)
	}
	return out
}

func seqs(rs []audit.Record) []uint64 {
	out := make([]uint64, len(rs))
	for i, r := range rs {
		out[i] = r.Seq
	}
	return out
}

func mustVerify(tb testing.TB, l *audit.Ledger) audit.Report {
	tb.Helper()
	rep, err := l.Verify(context.Background(), audit.VerifyOptions{})
	if err != nil {
		tb.Fatalf("Verify: %v (report %+v)", err, rep)
	}
	return rep
}

func segments(tb testing.TB, dir string) []string {
	tb.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "seg-*.log"))
	if err != nil {
		tb.Fatal(err)
	}
	slices.Sort(names)
	return names
}

// lines reads a segment as lines without their newlines.
func lines(tb testing.TB, path string) [][]byte {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	return bytes.Split(bytes.TrimSuffix(b, []byte("\n")), []byte("\n"))
}

func writeLines(tb testing.TB, path string, ls [][]byte) {
	tb.Helper()
	data := append(bytes.Join(ls, []byte("\n")), '\n')
	if len(ls) == 0 {
		data = nil
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		tb.Fatal(err)
	}
}
