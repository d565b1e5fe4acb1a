package kubestate

import (
	"context"
	"fmt"
	"io/fs"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"

	"github.com/meshca/meshca/ca"
)

// Defaults of Config.
const (
	DefaultName = "meshca-ca-journal"
	DefaultKey  = "journal.json"
)

// requestTimeout bounds each API call, so a wedged API server fails a
// rotation step instead of stalling it.
const requestTimeout = 10 * time.Second

// Config configures a SecretJournal.
type Config struct {
	Client    kubernetes.Interface
	Namespace string
	// Name of the Secret (default DefaultName) and the key in it that
	// holds the journal (default DefaultKey).
	Name, Key string
}

// SecretJournal is a ca.JournalStore in one key of a Secret. Other keys,
// labels and annotations of the Secret are kept on every write.
type SecretJournal struct{ cfg Config }

var _ ca.JournalStore = (*SecretJournal)(nil)

// NewSecretJournal validates cfg. It calls nothing.
func NewSecretJournal(cfg Config) (*SecretJournal, error) {
	if cfg.Client == nil || cfg.Namespace == "" {
		return nil, fmt.Errorf("kubestate: a client and a namespace are required")
	}
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	if cfg.Key == "" {
		cfg.Key = DefaultKey
	}
	return &SecretJournal{cfg: cfg}, nil
}

// Load implements ca.JournalStore. A Secret that is missing, or lacks the
// key or has it empty, holds no journal: the error matches fs.ErrNotExist.
func (j *SecretJournal) Load(ctx context.Context) ([]byte, string, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	s, err := j.secrets().Get(ctx, j.cfg.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, "", fmt.Errorf("kubestate: %s: %w (%w)", j.describe(), fs.ErrNotExist, err)
	}
	if err != nil {
		return nil, "", fmt.Errorf("kubestate: reading %s: %w", j.describe(), err)
	}
	data := s.Data[j.cfg.Key]
	if len(data) == 0 {
		return nil, "", fmt.Errorf("kubestate: %s has no key %q: %w", j.describe(), j.cfg.Key, fs.ErrNotExist)
	}
	return data, s.ResourceVersion, nil
}

// Save implements ca.JournalStore. It reads the Secret first, to keep what
// else is in it and to refuse a stale rev without writing; the write itself
// is conditional on the version read, so a writer that slips in between
// still makes it fail.
func (j *SecretJournal) Save(ctx context.Context, data []byte, rev string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	cur, err := j.secrets().Get(ctx, j.cfg.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		if rev != "" {
			return "", fmt.Errorf("kubestate: %s: %w: it was deleted", j.describe(), ca.ErrJournalConflict)
		}
		return j.create(ctx, data)
	case err != nil:
		return "", fmt.Errorf("kubestate: reading %s: %w", j.describe(), err)
	}
	stored := len(cur.Data[j.cfg.Key]) > 0
	switch {
	case rev == "" && stored:
		return "", fmt.Errorf("kubestate: %s: %w: a journal was stored meanwhile", j.describe(), ca.ErrJournalConflict)
	case rev != "" && cur.ResourceVersion != rev:
		return "", fmt.Errorf("kubestate: %s: %w: revision %s, expected %s", j.describe(), ca.ErrJournalConflict, cur.ResourceVersion, rev)
	}
	next := secretToWrite(cur, j.cfg.Namespace, j.cfg.Name, componentJournal)
	next.Data[j.cfg.Key] = data
	updated, err := j.secrets().Update(ctx, next, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) {
		return "", fmt.Errorf("kubestate: %s: %w (%w)", j.describe(), ca.ErrJournalConflict, err)
	}
	if err != nil {
		return "", fmt.Errorf("kubestate: writing %s: %w", j.describe(), err)
	}
	return updated.ResourceVersion, nil
}

func (j *SecretJournal) create(ctx context.Context, data []byte) (string, error) {
	s := secretToWrite(nil, j.cfg.Namespace, j.cfg.Name, componentJournal)
	s.Data[j.cfg.Key] = data
	created, err := j.secrets().Create(ctx, s, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return "", fmt.Errorf("kubestate: %s: %w (%w)", j.describe(), ca.ErrJournalConflict, err)
	}
	if err != nil {
		return "", fmt.Errorf("kubestate: creating %s: %w", j.describe(), err)
	}
	return created.ResourceVersion, nil
}

func (j *SecretJournal) secrets() typedcorev1.SecretInterface {
	return j.cfg.Client.CoreV1().Secrets(j.cfg.Namespace)
}

func (j *SecretJournal) describe() string {
	return "secret " + j.cfg.Namespace + "/" + j.cfg.Name
}
