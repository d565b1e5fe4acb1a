package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/keystore"
)

// KeyStore is what the CA needs from a keystore.
type KeyStore interface {
	GenerateKey(ctx context.Context, id string, kt keystore.KeyType) (crypto.Signer, error)
	GetKey(ctx context.Context, id string) (crypto.Signer, error)
}

// SelfManagedConfig configures a CA whose root and intermediate meshca
// creates and renews itself.
type SelfManagedConfig struct {
	TrustDomain spiffeid.TrustDomain
	Keys        KeyStore
	// JournalPath is where the CA state is recorded.
	JournalPath string
	// KeyType for the root and intermediates (default ecdsa-p256).
	KeyType         keystore.KeyType
	RootTTL         time.Duration // default 1 year
	IntermediateTTL time.Duration // default 48h
	Logger          *slog.Logger
}

// SelfManaged is a Source with a self-signed root and an intermediate
// renewed at half its lifetime, so the intermediate always covers at least
// half its lifetime worth of leaves.
type SelfManaged struct {
	cfg SelfManagedConfig

	mu      sync.Mutex
	journal *Journal
}

// NewSelfManaged validates cfg. It reads nothing until Load.
func NewSelfManaged(cfg SelfManagedConfig) (*SelfManaged, error) {
	if cfg.TrustDomain.IsZero() || cfg.Keys == nil || cfg.JournalPath == "" {
		return nil, fmt.Errorf("ca: self-managed CA needs a trust domain, a keystore and a journal path")
	}
	if cfg.KeyType == "" {
		cfg.KeyType = keystore.ECDSAP256
	}
	if cfg.RootTTL <= 0 {
		cfg.RootTTL = 365 * 24 * time.Hour
	}
	if cfg.IntermediateTTL <= 0 {
		cfg.IntermediateTTL = 48 * time.Hour
	}
	if cfg.IntermediateTTL >= cfg.RootTTL {
		return nil, fmt.Errorf("ca: intermediate TTL %s must be shorter than root TTL %s", cfg.IntermediateTTL, cfg.RootTTL)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &SelfManaged{cfg: cfg}, nil
}

// Load reads the journal, or creates a new root and intermediate when there
// is none yet.
func (s *SelfManaged) Load(ctx context.Context, now time.Time) (*Issuer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	j, err := LoadJournal(s.cfg.JournalPath)
	if isNotExist(err) {
		return s.bootstrap(ctx, now)
	}
	if err != nil {
		return nil, err
	}
	if _, err := j.rotation(); err != nil {
		return nil, fmt.Errorf("ca: journal %s: %w", s.cfg.JournalPath, err)
	}
	s.journal = j
	iss, err := s.issuerFromSlot(ctx, j.Current)
	if err != nil {
		return nil, err
	}
	if !now.Before(renewAt(iss.Cert)) {
		return s.renew(ctx, now)
	}
	return iss, nil
}

// Maintain renews the intermediate once it is past half its lifetime.
func (s *SelfManaged) Maintain(ctx context.Context, now time.Time, current *Issuer) (*Issuer, error) {
	if now.Before(renewAt(current.Cert)) {
		return nil, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.renew(ctx, now)
}

func renewAt(c *x509.Certificate) time.Time {
	return c.NotBefore.Add(c.NotAfter.Sub(c.NotBefore) / 2)
}

func (s *SelfManaged) bootstrap(ctx context.Context, now time.Time) (*Issuer, error) {
	rootID, root, err := s.newRoot(ctx, now)
	if err != nil {
		return nil, err
	}
	s.journal = &Journal{Current: &Slot{RootKeyID: rootID, RootCertPEM: string(EncodeCerts(root))}}
	s.cfg.Logger.Info("created a new self-signed root CA", "keyID", rootID,
		"notAfter", root.NotAfter, "fingerprint", Fingerprint(root))
	return s.renew(ctx, now)
}

// renew signs a new intermediate with the current root.
func (s *SelfManaged) renew(ctx context.Context, now time.Time) (*Issuer, error) {
	next := *s.journal
	slot := *next.Current
	next.Current = &slot
	oldKeyID := slot.IntermediateKeyID
	iss, err := s.signIntermediate(ctx, now, &next)
	if err != nil {
		return nil, err
	}
	// Leaves already issued stay valid without the old key; only signing
	// needs it, and nothing signs with it any more.
	s.deleteKey(ctx, oldKeyID, "renewed intermediate")
	return iss, nil
}

// signIntermediate signs a new intermediate with j.Current's root, puts it
// in j.Current and saves j as the journal before it is used: a crash before
// the save leaves the old state in force and at most an unused key behind.
func (s *SelfManaged) signIntermediate(ctx context.Context, now time.Time, j *Journal) (*Issuer, error) {
	slot := j.Current
	root, err := parseOne(slot.RootCertPEM)
	if err != nil {
		return nil, err
	}
	rootKey, err := s.cfg.Keys.GetKey(ctx, slot.RootKeyID)
	if err != nil {
		return nil, fmt.Errorf("ca: root key %s: %w", slot.RootKeyID, err)
	}
	id := newKeyID("intermediate", now)
	key, err := s.cfg.Keys.GenerateKey(ctx, id, s.cfg.KeyType)
	if err != nil {
		return nil, fmt.Errorf("ca: create intermediate key: %w", err)
	}
	serial, err := NewSerial(rand.Reader)
	if err != nil {
		return nil, err
	}
	v := Validity{NotBefore: now.Add(-Backdate), NotAfter: now.Add(s.cfg.IntermediateTTL)}
	if v.NotAfter.After(root.NotAfter) {
		v.NotAfter = root.NotAfter
	}
	tmpl, err := IntermediateTemplate(s.cfg.TrustDomain, key.Public(), serial, v)
	if err != nil {
		return nil, err
	}
	cert, err := createCert(tmpl, root, key.Public(), rootKey)
	if err != nil {
		return nil, err
	}
	slot.IntermediateKeyID = id
	slot.IntermediateCertPEM = string(EncodeCerts(cert))
	if err := j.Save(s.cfg.JournalPath); err != nil {
		return nil, err
	}
	s.journal = j
	s.cfg.Logger.Info("signed a new intermediate CA", "keyID", id, "notAfter", cert.NotAfter,
		"fingerprint", Fingerprint(cert))
	return &Issuer{Cert: cert, Signer: key, Chain: []*x509.Certificate{cert}, Roots: s.roots(root)}, nil
}

func (s *SelfManaged) issuerFromSlot(ctx context.Context, slot *Slot) (*Issuer, error) {
	root, err := parseOne(slot.RootCertPEM)
	if err != nil {
		return nil, err
	}
	cert, err := parseOne(slot.IntermediateCertPEM)
	if err != nil {
		return nil, err
	}
	key, err := s.cfg.Keys.GetKey(ctx, slot.IntermediateKeyID)
	if err != nil {
		return nil, fmt.Errorf("ca: intermediate key %s: %w", slot.IntermediateKeyID, err)
	}
	return &Issuer{Cert: cert, Signer: key, Chain: []*x509.Certificate{cert}, Roots: s.roots(root)}, nil
}

// roots is the trust bundle: the current root first, then the next one
// once a rotation has prepared it, then those retiring after an activation.
func (s *SelfManaged) roots(current *x509.Certificate) []*x509.Certificate {
	roots := []*x509.Certificate{current}
	others := s.journal.Retiring
	if s.journal.Next != nil {
		others = append([]*Slot{s.journal.Next}, others...)
	}
	for _, slot := range others {
		if c, err := parseOne(slot.RootCertPEM); err == nil {
			roots = append(roots, c)
		} else {
			s.cfg.Logger.Error("a root recorded in the CA journal does not parse; it is left out of the trust bundle", "keyID", slot.RootKeyID, "err", err)
		}
	}
	return roots
}

func createCert(tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("ca: sign %q: %w", tmpl.Subject.CommonName, err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	return c, nil
}

func parseOne(pemData string) (*x509.Certificate, error) {
	certs, err := ParseCerts([]byte(pemData))
	if err != nil {
		return nil, err
	}
	if len(certs) != 1 {
		return nil, fmt.Errorf("ca: want one certificate, found %d", len(certs))
	}
	return certs[0], nil
}

func newKeyID(role string, now time.Time) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%s-%s-%s", role, now.UTC().Format("20060102T150405Z"), hex.EncodeToString(b[:]))
}
