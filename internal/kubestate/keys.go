package kubestate

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/util/retry"

	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/keystore/disk"
)

// DefaultKeysName is the default name of the Secret of SecretFiles.
const DefaultKeysName = "meshca-ca-keys"

// writeRetry paces a write's attempts when other writers keep changing the
// Secret in between, jittered so that writers that conflicted do not
// collide again. Each conflict means another write succeeded, so replicas
// that write a few keys a year never come near its Steps. The sleeps do
// not watch ctx, but none is much over a second, and the attempt after
// one fails at once if ctx has ended.
var writeRetry = wait.Backoff{Steps: 12, Duration: 10 * time.Millisecond, Factor: 1.5, Jitter: 1}

// FilesConfig configures a SecretFiles.
type FilesConfig struct {
	Client    kubernetes.Interface
	Namespace string
	// Name of the Secret (default DefaultKeysName).
	Name string
}

// SecretFiles is a disk.Files in one Secret, a data key per file, so that
// server replicas share the disk keystore's encrypted format: the Secret
// holds only sealed key files and the KDF metadata, never a key or the
// passphrase. Other keys, labels and annotations of the Secret are kept on
// every write.
//
// Each write is a read-modify-write conditional on the resourceVersion
// read, retried on conflict, so files that replicas write at the same time
// are all kept. The Secret is created on the first write. Errors that say
// the API server cannot answer now match keystore.ErrUnavailable.
type SecretFiles struct{ cfg FilesConfig }

var _ disk.Files = (*SecretFiles)(nil)

// NewSecretFiles validates cfg. It calls nothing.
func NewSecretFiles(cfg FilesConfig) (*SecretFiles, error) {
	if cfg.Client == nil || cfg.Namespace == "" {
		return nil, fmt.Errorf("kubestate: a client and a namespace are required")
	}
	if cfg.Name == "" {
		cfg.Name = DefaultKeysName
	}
	return &SecretFiles{cfg: cfg}, nil
}

// Read implements disk.Files. A missing Secret or key is fs.ErrNotExist.
func (f *SecretFiles) Read(ctx context.Context, name string) ([]byte, error) {
	if err := checkDataKey(name); err != nil {
		return nil, err
	}
	s, err := f.get(ctx)
	if err != nil {
		return nil, f.fail("reading", err)
	}
	data, ok := s.Data[name]
	if !ok {
		return nil, fmt.Errorf("kubestate: %s: %w", f.Locate(name), fs.ErrNotExist)
	}
	return data, nil
}

// Write implements disk.Files: one update replaces the key's value.
func (f *SecretFiles) Write(ctx context.Context, name string, data []byte) error {
	return f.modify(ctx, "writing", name, func(m map[string][]byte) error {
		m[name] = data
		return nil
	})
}

// Create implements disk.Files.
func (f *SecretFiles) Create(ctx context.Context, name string, data []byte) error {
	return f.modify(ctx, "creating", name, func(m map[string][]byte) error {
		if _, ok := m[name]; ok {
			return fs.ErrExist
		}
		m[name] = data
		return nil
	})
}

// Remove implements disk.Files.
func (f *SecretFiles) Remove(ctx context.Context, name string) error {
	return f.modify(ctx, "removing", name, func(m map[string][]byte) error {
		if _, ok := m[name]; !ok {
			return fs.ErrNotExist
		}
		delete(m, name)
		return nil
	})
}

// List implements disk.Files. A missing Secret holds no files.
func (f *SecretFiles) List(ctx context.Context) ([]string, error) {
	s, err := f.get(ctx)
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, f.fail("reading", err)
	}
	names := make([]string, 0, len(s.Data))
	for k := range s.Data {
		names = append(names, k)
	}
	slices.Sort(names)
	return names, nil
}

// Locate implements disk.Files.
func (f *SecretFiles) Locate(name string) string {
	if name == "" {
		return f.describe()
	}
	return f.describe() + " key " + name
}

// get reads the Secret; a missing one is fs.ErrNotExist as well as
// apierrors.IsNotFound.
func (f *SecretFiles) get(ctx context.Context) (*corev1.Secret, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	s, err := f.secrets().Get(ctx, f.cfg.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("%w (%w)", fs.ErrNotExist, err)
	}
	return s, err
}

// modify applies change to the Secret's data and stores the result, trying
// again from a fresh read when another writer got there first. An error
// from change (fs.ErrExist, fs.ErrNotExist) ends it with nothing written.
func (f *SecretFiles) modify(ctx context.Context, verb, name string, change func(map[string][]byte) error) error {
	if err := checkDataKey(name); err != nil {
		return err
	}
	err := retry.OnError(writeRetry, overtaken, func() error { return f.modifyOnce(ctx, change) })
	var changeErr changeError
	switch {
	case errors.As(err, &changeErr):
		return fmt.Errorf("kubestate: %s: %w", f.Locate(name), changeErr.err)
	case overtaken(err):
		return fmt.Errorf("kubestate: %s key %s of %s: gave up after %d attempts, each overtaken by another writer: %w", verb, name, f.describe(), writeRetry.Steps, err)
	case err != nil:
		return f.fail(verb+" key "+name+" of", err)
	}
	return nil
}

// overtaken reports whether a write failed because another writer changed
// or created the Secret since it was read.
func overtaken(err error) bool {
	return apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err)
}

// changeError carries an error of modify's change function, which ends the
// write rather than being retried.
type changeError struct{ err error }

func (e changeError) Error() string { return e.err.Error() }

// modifyOnce is one read-modify-write. It returns API errors unwrapped, so
// modify can recognise conflicts.
func (f *SecretFiles) modifyOnce(ctx context.Context, change func(map[string][]byte) error) error {
	cur, err := f.get(ctx)
	absent := apierrors.IsNotFound(err)
	if err != nil && !absent {
		return err
	}
	if absent {
		cur = nil
	}
	next := secretToWrite(cur, f.cfg.Namespace, f.cfg.Name, componentKeys)
	if err := change(next.Data); err != nil {
		return changeError{err}
	}
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	if absent {
		_, err = f.secrets().Create(ctx, next, metav1.CreateOptions{})
		return err
	}
	// The update carries the resourceVersion read: a write by anyone else
	// since makes it fail with a conflict instead of undoing theirs.
	_, err = f.secrets().Update(ctx, next, metav1.UpdateOptions{})
	return err
}

// fail wraps an API error, marking those that say the API server cannot
// answer now as keystore.ErrUnavailable: the CA then retries later.
func (f *SecretFiles) fail(verb string, err error) error {
	if apiUnavailable(err) {
		return fmt.Errorf("kubestate: %s %s: %w (%w)", verb, f.describe(), keystore.ErrUnavailable, err)
	}
	return fmt.Errorf("kubestate: %s %s: %w", verb, f.describe(), err)
}

// apiUnavailable reports errors of an API server that is down, unreachable,
// overloaded or cut off from etcd, as opposed to a refused request.
func apiUnavailable(err error) bool {
	var (
		opErr  *net.OpError
		dnsErr *net.DNSError
	)
	return errors.Is(err, context.DeadlineExceeded) || errors.As(err, &opErr) || errors.As(err, &dnsErr) ||
		utilnet.IsConnectionRefused(err) || utilnet.IsConnectionReset(err) || utilnet.IsProbableEOF(err) ||
		apierrors.IsServerTimeout(err) || apierrors.IsTimeout(err) || apierrors.IsTooManyRequests(err) ||
		apierrors.IsServiceUnavailable(err) || apierrors.IsInternalError(err)
}

// checkDataKey refuses a file name that cannot be a Secret's data key, before
// the API server would.
func checkDataKey(name string) error {
	if msgs := validation.IsConfigMapKey(name); len(msgs) > 0 {
		return fmt.Errorf("kubestate: %q cannot be a Secret key: %s", name, strings.Join(msgs, "; "))
	}
	return nil
}

func (f *SecretFiles) secrets() typedcorev1.SecretInterface {
	return f.cfg.Client.CoreV1().Secrets(f.cfg.Namespace)
}

func (f *SecretFiles) describe() string {
	return "secret " + f.cfg.Namespace + "/" + f.cfg.Name
}
