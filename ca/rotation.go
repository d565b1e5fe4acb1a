package ca

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/meshca/meshca/keystore"
)

// Phase is where a root rotation stands, as recorded in the journal.
type Phase string

// Rotation phases. A rotation goes idle → prepared → activated → idle.
const (
	// PhaseIdle: one root, which signs.
	PhaseIdle Phase = "idle"
	// PhasePrepared: a next root is in the trust bundle but signs nothing.
	PhasePrepared Phase = "prepared"
	// PhaseActivated: the new root signs; the old one stays in the bundle
	// until the leaves it covers have expired.
	PhaseActivated Phase = "activated"
)

// Step is one transition of a root rotation.
type Step string

// Rotation steps.
const (
	StepPrepare  Step = "prepare"
	StepActivate Step = "activate"
	StepRetire   Step = "retire"
)

// ErrRotationUnsupported reports a CA whose root meshca does not manage.
var ErrRotationUnsupported = errors.New("ca: this CA's root is not managed by meshca (plugged-in CA files are rotated by replacing them)")

// ErrRotationPhase reports a step that does not apply in the current phase.
var ErrRotationPhase = errors.New("ca: wrong rotation phase")

// Rotation describes the roots and the phase of a rotation.
type Rotation struct {
	Phase Phase
	// Current signs, through Intermediate.
	Current      *x509.Certificate
	Intermediate *x509.Certificate
	// Next is the prepared root (PhasePrepared only).
	Next *x509.Certificate
	// Retiring are the roots replaced by the last activation, with the
	// intermediates they signed through (PhaseActivated only).
	Retiring              []*x509.Certificate
	RetiringIntermediates []*x509.Certificate
	// PreparedAt and ActivatedAt are zero when they do not apply.
	PreparedAt, ActivatedAt time.Time
}

// Bundle lists every root of the rotation: current, next, retiring.
func (r Rotation) Bundle() []*x509.Certificate {
	out := []*x509.Certificate{r.Current}
	if r.Next != nil {
		out = append(out, r.Next)
	}
	return append(out, r.Retiring...)
}

// RootRotator is a Source whose root meshca can rotate. Each step records
// its outcome in durable state before it returns the issuer to install, so
// a crash between steps resumes in the phase last recorded.
type RootRotator interface {
	Rotation() (Rotation, error)
	Rotate(ctx context.Context, now time.Time, step Step) (*Issuer, error)
}

// Rotation returns the state of the root rotation.
func (s *SelfManaged) Rotation() (Rotation, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.journal == nil {
		return Rotation{}, ErrNotReady
	}
	r, err := s.journal.rotation()
	if err == nil && s.cfg.PerReplicaIntermediates && s.local != nil && s.local.rootKeyID == s.journal.Current.RootKeyID {
		r.Intermediate = s.local.cert
	}
	return r, err
}

func (j *Journal) rotation() (Rotation, error) {
	var r Rotation
	var err error
	if r.Current, err = parseOne(j.Current.RootCertPEM); err != nil {
		return r, err
	}
	// Per-replica intermediates are not in the journal.
	if j.Current.IntermediateCertPEM != "" {
		if r.Intermediate, err = parseOne(j.Current.IntermediateCertPEM); err != nil {
			return r, err
		}
	}
	r.Phase = PhaseIdle
	if j.Next != nil {
		r.Phase = PhasePrepared
		if r.Next, err = parseOne(j.Next.RootCertPEM); err != nil {
			return r, err
		}
	}
	for _, slot := range j.Retiring {
		root, err := parseOne(slot.RootCertPEM)
		if err != nil {
			return r, err
		}
		r.Retiring = append(r.Retiring, root)
		if slot.IntermediateCertPEM != "" {
			interm, err := parseOne(slot.IntermediateCertPEM)
			if err != nil {
				return r, err
			}
			r.RetiringIntermediates = append(r.RetiringIntermediates, interm)
		}
	}
	if len(j.Retiring) > 0 && j.Next == nil {
		r.Phase = PhaseActivated
	}
	if j.PreparedAt != nil {
		r.PreparedAt = *j.PreparedAt
	}
	if j.ActivatedAt != nil {
		r.ActivatedAt = *j.ActivatedAt
	}
	return r, nil
}

// Rotate performs one rotation step and returns the issuer to install.
//
//   - prepare creates a root key and a self-signed root and adds it to the
//     bundle; the current intermediate keeps signing. Only from idle.
//   - activate signs a new intermediate with the prepared root and makes
//     that slot current; the old slot is kept as retiring, in the bundle,
//     and its intermediate key is deleted since it will sign nothing more.
//   - retire drops the retiring roots from the bundle and deletes their
//     keys. Whether that is safe (no live leaf left under them) is for the
//     caller to decide: the CA does not know what it has issued.
//
// The journal is saved before the issuer is returned; keys are deleted only
// after, so a crash leaves at worst an unused key behind.
func (s *SelfManaged) Rotate(ctx context.Context, now time.Time, step Step) (*Issuer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.journal == nil {
		return nil, ErrNotReady
	}
	// Decide on the journal as stored, not as last read: a replica that
	// has just become leader may not have followed its predecessor's last
	// step yet, and would have its step refused as a conflict or judged
	// against a phase that has passed.
	changed, err := s.reload(ctx)
	if err != nil {
		return nil, err
	}
	s.unfollowed = s.unfollowed || changed
	var iss *Issuer
	switch step {
	case StepPrepare:
		iss, err = s.prepare(ctx, now)
	case StepActivate:
		iss, err = s.activate(ctx, now)
	case StepRetire:
		iss, err = s.retire(ctx, now)
	default:
		err = fmt.Errorf("ca: unknown rotation step %q", step)
	}
	if err != nil {
		return nil, err
	}
	s.unfollowed = false
	return iss, nil
}

func (s *SelfManaged) prepare(ctx context.Context, now time.Time) (*Issuer, error) {
	j := s.journal
	switch {
	case j.Next != nil:
		return nil, fmt.Errorf("%w: a next root is already prepared; activate it", ErrRotationPhase)
	case len(j.Retiring) > 0:
		return nil, fmt.Errorf("%w: the previous rotation has not retired its old root yet", ErrRotationPhase)
	}
	rootID, root, err := s.newRoot(ctx, now)
	if err != nil {
		return nil, err
	}
	next := *j
	next.Next = &Slot{RootKeyID: rootID, RootCertPEM: string(EncodeCerts(root))}
	at := now.UTC()
	next.PreparedAt, next.ActivatedAt = &at, nil
	if err := s.save(ctx, &next); err != nil {
		// A refused write is routine among replicas (another wrote
		// first): the unrecorded key must not pile up in the keystore.
		s.deleteKey(ctx, rootID, "root of a prepare that was not recorded")
		return nil, err
	}
	s.cfg.Logger.Info("prepared a new root CA; it is in the trust bundle and signs nothing yet",
		"keyID", rootID, "notAfter", root.NotAfter, "fingerprint", Fingerprint(root))
	return s.currentIssuer(ctx, now)
}

func (s *SelfManaged) activate(ctx context.Context, now time.Time) (*Issuer, error) {
	j := s.journal
	if j.Next == nil {
		return nil, fmt.Errorf("%w: no next root is prepared; run prepare first", ErrRotationPhase)
	}
	old := *j.Current
	next := *j
	slot := *j.Next
	next.Current, next.Next = &slot, nil
	next.Retiring = append(append([]*Slot(nil), j.Retiring...), &old)
	at := now.UTC()
	next.ActivatedAt = &at
	iss, err := s.signIntermediate(ctx, now, &next)
	if err != nil {
		return nil, err
	}
	s.cfg.Logger.Info("activated the new root CA: it signs from now on", "fingerprint", Fingerprint(iss.Roots[0]),
		"retiring", old.RootKeyID)
	s.deleteKey(ctx, old.IntermediateKeyID, "intermediate of the retiring root")
	return iss, nil
}

func (s *SelfManaged) retire(ctx context.Context, now time.Time) (*Issuer, error) {
	j := s.journal
	if j.Next != nil || len(j.Retiring) == 0 {
		return nil, fmt.Errorf("%w: no root is retiring; activate a prepared root first", ErrRotationPhase)
	}
	next := *j
	retired := j.Retiring
	next.Retiring, next.PreparedAt, next.ActivatedAt = nil, nil, nil
	if err := s.save(ctx, &next); err != nil {
		return nil, err
	}
	for _, slot := range retired {
		s.cfg.Logger.Info("retired a root CA: it has left the trust bundle", "keyID", slot.RootKeyID)
		s.deleteKey(ctx, slot.RootKeyID, "retired root")
	}
	return s.currentIssuer(ctx, now)
}

// newRoot creates a root key and its self-signed certificate.
func (s *SelfManaged) newRoot(ctx context.Context, now time.Time) (string, *x509.Certificate, error) {
	rootID := newKeyID("root", now)
	rootKey, err := s.cfg.Keys.GenerateKey(ctx, rootID, s.cfg.KeyType)
	if err != nil {
		return "", nil, fmt.Errorf("ca: create root key: %w", err)
	}
	serial, err := NewSerial(rand.Reader)
	if err != nil {
		return "", nil, err
	}
	tmpl, err := RootTemplate(s.cfg.TrustDomain, rootKey.Public(), serial,
		Validity{NotBefore: now.Add(-Backdate), NotAfter: now.Add(s.cfg.RootTTL)})
	if err != nil {
		return "", nil, err
	}
	root, err := createCert(tmpl, tmpl, rootKey.Public(), rootKey)
	if err != nil {
		return "", nil, err
	}
	return rootID, root, nil
}

func (s *SelfManaged) deleteKey(ctx context.Context, id, what string) {
	d, ok := s.cfg.Keys.(keystore.Deleter)
	if !ok || id == "" {
		return
	}
	if err := d.DeleteKey(ctx, id); err != nil {
		s.cfg.Logger.Warn("could not delete a key that is no longer used", "what", what, "keyID", id, "err", err)
	}
}

// currentIssuer is the issuer of the journal's current slot after a step
// that did not change it.
func (s *SelfManaged) currentIssuer(ctx context.Context, now time.Time) (*Issuer, error) {
	if !s.cfg.PerReplicaIntermediates {
		return s.issuerFromSlot(ctx, s.journal.Current)
	}
	if s.local == nil || s.local.rootKeyID != s.journal.Current.RootKeyID {
		return s.signLocal(ctx, now)
	}
	return s.localIssuer()
}
