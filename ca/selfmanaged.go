package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
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
	// Keys holds the root keys, and the intermediate keys unless
	// PerReplicaIntermediates is set.
	Keys KeyStore
	// Journal records the CA state. JournalPath is shorthand for a
	// FileJournal; one of the two is required.
	Journal     JournalStore
	JournalPath string
	// PerReplicaIntermediates gives each process its own intermediate: the
	// key is generated in memory, signed by the root through Keys, and never
	// written anywhere, so the journal holds only roots. It suits a keystore
	// that is remote (Vault) or shared by replicas: leaves are signed
	// locally, and Keys is used only at start, at each renewal and for root
	// rotation.
	PerReplicaIntermediates bool
	// KeyType for the root and intermediates (default ecdsa-p256).
	KeyType         keystore.KeyType
	RootTTL         time.Duration // default 1 year
	IntermediateTTL time.Duration // default 48h
	Logger          *slog.Logger
}

// SelfManaged is a Source with a self-signed root and an intermediate
// renewed at half its lifetime, so the intermediate always covers at least
// half its lifetime worth of leaves.
//
// Several processes may share one journal (replicas of a server): each
// Maintain re-reads it and follows what another wrote (a rotation step, a
// renewed shared intermediate), and every write is a compare-and-swap on
// the revision read, so two writers never silently undo each other.
type SelfManaged struct {
	cfg SelfManagedConfig

	mu      sync.Mutex
	journal *Journal
	rev     string
	// local is this process's own intermediate (PerReplicaIntermediates).
	local *localIntermediate
	// unfollowed says the journal in use was read by a rotation step that
	// then failed: the Authority still has the issuer of the journal
	// before, and the next Maintain must hand over the new one.
	unfollowed bool
}

// localIntermediate is a per-replica intermediate and the root it chains to.
type localIntermediate struct {
	rootKeyID string
	cert      *x509.Certificate
	key       crypto.Signer
}

// NewSelfManaged validates cfg. It reads nothing until Load.
func NewSelfManaged(cfg SelfManagedConfig) (*SelfManaged, error) {
	if cfg.Journal == nil && cfg.JournalPath != "" {
		cfg.Journal = FileJournal{Path: cfg.JournalPath}
	}
	if cfg.TrustDomain.IsZero() || cfg.Keys == nil || cfg.Journal == nil {
		return nil, fmt.Errorf("ca: self-managed CA needs a trust domain, a keystore and a journal")
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

// Load reads the journal, or creates a new root when there is none yet, and
// returns the issuer: the journal's intermediate, renewed if it is due, or
// a fresh per-replica one.
func (s *SelfManaged) Load(ctx context.Context, now time.Time) (*Issuer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.reload(ctx); isNotExist(err) {
		if err := s.bootstrap(ctx, now); err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, err
	}
	return s.issuer(ctx, now, true)
}

// Maintain follows changes another process made to the journal and renews
// the intermediate once it is past half its lifetime. A journal that cannot
// be read leaves the current issuer in place.
func (s *SelfManaged) Maintain(ctx context.Context, now time.Time, current *Issuer) (*Issuer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed, err := s.reload(ctx)
	if err != nil {
		return nil, err
	}
	changed = changed || s.unfollowed
	if !changed && now.Before(renewAt(current.Cert)) {
		return nil, nil
	}
	iss, err := s.issuer(ctx, now, changed)
	if err != nil {
		return nil, err
	}
	s.unfollowed = false
	return iss, nil
}

// reload reads the journal and adopts it when its revision differs from the
// one in use.
func (s *SelfManaged) reload(ctx context.Context) (changed bool, err error) {
	data, rev, err := s.cfg.Journal.Load(ctx)
	if err != nil {
		return false, err
	}
	if s.journal != nil && rev == s.rev {
		return false, nil
	}
	j, err := parseJournal(data)
	if err != nil {
		return false, err
	}
	if _, err := j.rotation(); err != nil {
		return false, fmt.Errorf("ca: journal: %w", err)
	}
	if s.journal != nil {
		s.cfg.Logger.Info("the CA journal was changed by another process; following it", "revision", rev)
	}
	s.journal, s.rev = j, rev
	return true, nil
}

// save writes j if the journal is still at the revision last read, and
// makes it the state in use. On a conflict the next reload adopts the
// other writer's state.
func (s *SelfManaged) save(ctx context.Context, j *Journal) error {
	data, err := j.marshal()
	if err != nil {
		return err
	}
	rev, err := s.cfg.Journal.Save(ctx, data, s.rev)
	if err != nil {
		return err
	}
	s.journal, s.rev = j, rev
	return nil
}

// issuer returns the issuer for the journal in use, renewing the
// intermediate when it is missing, due, or (per replica) under another root.
// fresh says the journal was just (re)read.
func (s *SelfManaged) issuer(ctx context.Context, now time.Time, fresh bool) (*Issuer, error) {
	cur := s.journal.Current
	if s.cfg.PerReplicaIntermediates {
		l := s.local
		if l == nil || l.rootKeyID != cur.RootKeyID || !now.Before(renewAt(l.cert)) {
			return s.signLocal(ctx, now)
		}
		if !fresh {
			return nil, nil
		}
		return s.localIssuer()
	}
	if cur.IntermediateCertPEM == "" {
		// Written by replicas with their own intermediates.
		return s.renew(ctx, now)
	}
	iss, err := s.issuerFromSlot(ctx, cur)
	if err != nil {
		return nil, err
	}
	if !now.Before(renewAt(iss.Cert)) {
		return s.renew(ctx, now)
	}
	return iss, nil
}

func renewAt(c *x509.Certificate) time.Time {
	return c.NotBefore.Add(c.NotAfter.Sub(c.NotBefore) / 2)
}

// bootstrap creates the first root and records it. When another replica
// records one first, its root is adopted and ours discarded.
func (s *SelfManaged) bootstrap(ctx context.Context, now time.Time) error {
	rootID, root, err := s.newRoot(ctx, now)
	if err != nil {
		return err
	}
	s.journal, s.rev = nil, ""
	err = s.save(ctx, &Journal{Current: &Slot{RootKeyID: rootID, RootCertPEM: string(EncodeCerts(root))}})
	if errors.Is(err, ErrJournalConflict) {
		s.deleteKey(ctx, rootID, "root of a lost start-up race")
		_, err = s.reload(ctx)
		return err
	}
	if err != nil {
		return err
	}
	s.cfg.Logger.Info("created a new self-signed root CA", "keyID", rootID,
		"notAfter", root.NotAfter, "fingerprint", Fingerprint(root))
	return nil
}

// renew signs a new shared intermediate with the current root.
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
// A per-replica intermediate stays in memory and j is saved as it is, once
// the intermediate is signed: a keystore that cannot sign changes nothing.
func (s *SelfManaged) signIntermediate(ctx context.Context, now time.Time, j *Journal) (*Issuer, error) {
	if s.cfg.PerReplicaIntermediates {
		l, err := s.newLocal(ctx, now, j.Current)
		if err != nil {
			return nil, err
		}
		if err := s.save(ctx, j); err != nil {
			return nil, err
		}
		s.local = l
		return s.localIssuer()
	}
	slot := j.Current
	id := newKeyID("intermediate", now)
	key, err := s.cfg.Keys.GenerateKey(ctx, id, s.cfg.KeyType)
	if err != nil {
		return nil, fmt.Errorf("ca: create intermediate key: %w", err)
	}
	cert, root, err := s.certifyIntermediate(ctx, now, slot, key)
	if err != nil {
		s.deleteKey(ctx, id, "unsigned intermediate")
		return nil, err
	}
	slot.IntermediateKeyID = id
	slot.IntermediateCertPEM = string(EncodeCerts(cert))
	if err := s.save(ctx, j); err != nil {
		s.deleteKey(ctx, id, "unrecorded intermediate")
		return nil, err
	}
	s.cfg.Logger.Info("signed a new intermediate CA", "keyID", id, "notAfter", cert.NotAfter,
		"fingerprint", Fingerprint(cert))
	return &Issuer{Cert: cert, Signer: key, Chain: []*x509.Certificate{cert}, Roots: s.roots(root)}, nil
}

// signLocal makes this replica's intermediate under the journal's current
// root and uses it.
func (s *SelfManaged) signLocal(ctx context.Context, now time.Time) (*Issuer, error) {
	l, err := s.newLocal(ctx, now, s.journal.Current)
	if err != nil {
		return nil, err
	}
	s.local = l
	return s.localIssuer()
}

// newLocal signs a per-replica intermediate under slot's root. Only the
// root's signature involves the keystore.
func (s *SelfManaged) newLocal(ctx context.Context, now time.Time, slot *Slot) (*localIntermediate, error) {
	key, err := keystore.Generate(s.cfg.KeyType)
	if err != nil {
		return nil, fmt.Errorf("ca: create intermediate key: %w", err)
	}
	cert, _, err := s.certifyIntermediate(ctx, now, slot, key)
	if err != nil {
		return nil, err
	}
	s.cfg.Logger.Info("signed this replica's intermediate CA", "notAfter", cert.NotAfter,
		"fingerprint", Fingerprint(cert), "root", slot.RootKeyID)
	return &localIntermediate{rootKeyID: slot.RootKeyID, cert: cert, key: key}, nil
}

func (s *SelfManaged) localIssuer() (*Issuer, error) {
	root, err := parseOne(s.journal.Current.RootCertPEM)
	if err != nil {
		return nil, err
	}
	l := s.local
	return &Issuer{Cert: l.cert, Signer: l.key, Chain: []*x509.Certificate{l.cert}, Roots: s.roots(root)}, nil
}

// certifyIntermediate has slot's root sign an intermediate for key.
func (s *SelfManaged) certifyIntermediate(ctx context.Context, now time.Time, slot *Slot, key crypto.Signer) (cert, root *x509.Certificate, err error) {
	if root, err = parseOne(slot.RootCertPEM); err != nil {
		return nil, nil, err
	}
	rootKey, err := s.cfg.Keys.GetKey(ctx, slot.RootKeyID)
	if err != nil {
		return nil, nil, fmt.Errorf("ca: root key %s: %w", slot.RootKeyID, err)
	}
	serial, err := NewSerial(rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	v := Validity{NotBefore: now.Add(-Backdate), NotAfter: now.Add(s.cfg.IntermediateTTL)}
	if v.NotAfter.After(root.NotAfter) {
		v.NotAfter = root.NotAfter
	}
	tmpl, err := IntermediateTemplate(s.cfg.TrustDomain, key.Public(), serial, v)
	if err != nil {
		return nil, nil, err
	}
	if cert, err = createCert(tmpl, root, key.Public(), rootKey); err != nil {
		return nil, nil, err
	}
	return cert, root, nil
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
