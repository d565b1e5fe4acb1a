package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"
)

// Istio's cacerts layout, kept so existing plugged-in CA secrets work as-is.
const (
	CACertFile    = "ca-cert.pem"    // the certificate that signs leaves
	CAKeyFile     = "ca-key.pem"     // its private key
	CertChainFile = "cert-chain.pem" // ca-cert up towards the root (optional)
	RootCertFile  = "root-cert.pem"  // trust anchors
)

// PluggedInConfig configures a CA whose signing certificate and key an
// operator provides as files.
type PluggedInConfig struct {
	Dir    string
	Logger *slog.Logger
}

// PluggedIn is a Source reading Istio-style cacerts files, reloaded when
// their content changes (Kubernetes updates mounted Secrets by swapping a
// symlink, so content, not mtime, is what is compared).
type PluggedIn struct {
	cfg  PluggedInConfig
	seen [sha256.Size]byte
}

// NewPluggedIn validates cfg. It reads nothing until Load.
func NewPluggedIn(cfg PluggedInConfig) (*PluggedIn, error) {
	if cfg.Dir == "" {
		return nil, fmt.Errorf("ca: plugged-in CA needs a directory")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &PluggedIn{cfg: cfg}, nil
}

// Load reads the files.
func (p *PluggedIn) Load(context.Context, time.Time) (*Issuer, error) {
	files, digest, err := p.read()
	if err != nil {
		return nil, err
	}
	p.seen = digest
	return p.parse(files)
}

// Maintain returns a new issuer when the files changed. Content that fails
// to parse is reported once, not on every tick, until it changes again.
func (p *PluggedIn) Maintain(context.Context, time.Time, *Issuer) (*Issuer, error) {
	files, digest, err := p.read()
	if err != nil {
		return nil, err
	}
	if digest == p.seen {
		return nil, nil
	}
	p.seen = digest
	iss, err := p.parse(files)
	if err != nil {
		return nil, fmt.Errorf("ca: plugged-in CA files in %s changed but are unusable, keeping the previous CA: %w", p.cfg.Dir, err)
	}
	return iss, nil
}

type caFiles struct{ cert, key, chain, root []byte }

func (p *PluggedIn) read() (caFiles, [sha256.Size]byte, error) {
	var f caFiles
	var err error
	read := func(name string, optional bool) []byte {
		if err != nil {
			return nil
		}
		b, e := os.ReadFile(filepath.Join(p.cfg.Dir, name))
		if e != nil && !(optional && errors.Is(e, fs.ErrNotExist)) {
			err = fmt.Errorf("ca: plugged-in CA: %w", e)
		}
		return b
	}
	f.cert = read(CACertFile, false)
	f.key = read(CAKeyFile, false)
	f.chain = read(CertChainFile, true)
	f.root = read(RootCertFile, false)
	if err != nil {
		return caFiles{}, [sha256.Size]byte{}, err
	}
	h := sha256.New()
	for _, b := range [][]byte{f.cert, f.key, f.chain, f.root} {
		fmt.Fprintf(h, "%d:", len(b))
		h.Write(b)
	}
	var d [sha256.Size]byte
	copy(d[:], h.Sum(nil))
	return f, d, nil
}

func (p *PluggedIn) parse(f caFiles) (*Issuer, error) {
	certs, err := ParseCerts(f.cert)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CACertFile, err)
	}
	cert := certs[0]
	key, err := parsePrivateKey(f.key)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CAKeyFile, err)
	}
	roots, err := ParseCerts(f.root)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", RootCertFile, err)
	}
	chain := []*x509.Certificate{cert}
	if len(bytes.TrimSpace(f.chain)) > 0 {
		extra, err := ParseCerts(f.chain)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", CertChainFile, err)
		}
		// Istio's cert-chain.pem usually repeats ca-cert and the root; the
		// chain sent to workloads carries each certificate once and the
		// root only at the end.
		for _, c := range extra {
			if c.Equal(cert) || containsCert(roots, c) {
				continue
			}
			chain = append(chain, c)
		}
	}
	if cert.Equal(roots[0]) && len(roots) == 1 {
		p.cfg.Logger.Warn("plugged-in CA signs leaves directly with its root; an intermediate is safer")
	}
	return &Issuer{Cert: cert, Signer: key, Chain: chain, Roots: roots}, nil
}

func containsCert(set []*x509.Certificate, c *x509.Certificate) bool {
	for _, s := range set {
		if s.Equal(c) {
			return true
		}
	}
	return false
}

func parsePrivateKey(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("ca: no PEM private key found")
	}
	var key any
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("ca: unsupported PEM block %q for a private key", block.Type)
	}
	if err != nil {
		// The parse error never contains key material, but say little anyway.
		return nil, fmt.Errorf("ca: cannot parse %s", block.Type)
	}
	s, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("ca: private key of type %T cannot sign", key)
	}
	return s, nil
}
