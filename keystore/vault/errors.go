package vault

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"

	"github.com/hashicorp/vault/api"

	"github.com/meshca/meshca/keystore"
)

// Causes of failure, for errors.Is. Check reports the first that applies;
// other operations report them too when Vault's answer shows the cause.
var (
	// ErrUnreachable reports that Vault did not answer: a wrong address, a
	// closed port, a DNS failure, or a certificate that does not verify.
	ErrUnreachable error = unavailableError("keystore/vault: Vault unreachable")
	// ErrSealed reports a sealed or uninitialised Vault.
	ErrSealed error = unavailableError("keystore/vault: Vault is sealed")
	// ErrMountMissing reports that no Transit secrets engine is mounted at
	// the configured path.
	ErrMountMissing = errors.New("keystore/vault: Transit mount missing")
	// ErrLoginRefused reports that Vault rejected the credentials: a bad,
	// expired or revoked token, a wrong AppRole role or secret ID, or a
	// Kubernetes role or service account token it does not accept.
	ErrLoginRefused = errors.New("keystore/vault: login refused")
	// ErrPermissionDenied reports that the token's policies do not allow an
	// operation on meshca's keys.
	ErrPermissionDenied = errors.New("keystore/vault: permission denied")
	// ErrExportable reports a Transit key that allows export or plaintext
	// backup: its private key may exist outside Vault, so it is not used.
	ErrExportable = errors.New("keystore/vault: key is exportable")
)

// unavailableError is a cause that matches keystore.ErrUnavailable: the
// CA keeps signing on what it has and retries.
type unavailableError string

func (e unavailableError) Error() string { return string(e) }

func (e unavailableError) Is(target error) bool { return target == keystore.ErrUnavailable }

// responseError shortens the api's multi-line error to one line, keeping it
// in the chain for errors.As.
type responseError struct{ re *api.ResponseError }

func (e *responseError) Error() string {
	path := e.re.URL
	if u, err := url.Parse(e.re.URL); err == nil {
		path = u.Path
	}
	var msgs []string
	for _, m := range e.re.Errors {
		msgs = append(msgs, flatten(m)...)
	}
	if len(msgs) == 0 {
		msgs = []string{http.StatusText(e.re.StatusCode)}
	}
	return fmt.Sprintf("%s %s: HTTP %d: %s", e.re.HTTPMethod, path, e.re.StatusCode, strings.Join(msgs, "; "))
}

// flatten turns Vault's multi-line "2 errors occurred:\n\t* a\n\t* b"
// into its items.
func flatten(msg string) []string {
	if !strings.Contains(msg, "\n") {
		return []string{msg}
	}
	var items []string
	for _, line := range strings.Split(msg, "\n") {
		line = strings.TrimSpace(line)
		if item, ok := strings.CutPrefix(line, "* "); ok {
			items = append(items, item)
		}
	}
	if len(items) == 0 {
		return []string{strings.Join(strings.Fields(msg), " ")}
	}
	return items
}

func (e *responseError) Unwrap() error { return e.re }

// wrap describes a failed Vault call. When the cause is one of the package's
// errors it leads, so messages read "keystore/vault: permission denied: op:
// detail" and match with errors.Is.
func wrap(op string, err error) error {
	var re *api.ResponseError
	if errors.As(err, &re) {
		err = &responseError{re}
	}
	if kind := causeOf(err); kind != nil {
		return fmt.Errorf("%w: %s: %w", kind, op, err)
	}
	return fmt.Errorf("keystore/vault: %s: %w", op, err)
}

func causeOf(err error) error {
	var re *api.ResponseError
	if errors.As(err, &re) {
		switch {
		case re.StatusCode == http.StatusForbidden && mentions(re.Errors, "invalid token"):
			return ErrLoginRefused
		case re.StatusCode == http.StatusForbidden:
			return ErrPermissionDenied
		case re.StatusCode == http.StatusServiceUnavailable && mentions(re.Errors, "sealed"):
			return ErrSealed
		case re.StatusCode == http.StatusNotFound && mentions(re.Errors, "no handler for route"):
			return ErrMountMissing
		}
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return nil
	}
	var ue *url.Error
	var oe *net.OpError
	if errors.As(err, &ue) || errors.As(err, &oe) {
		return ErrUnreachable
	}
	return nil
}

func mentions(msgs []string, s string) bool {
	for _, m := range msgs {
		if strings.Contains(m, s) {
			return true
		}
	}
	return false
}

// isNotFound reports Vault's answer for a path that exists but holds
// nothing: a 404 with no error messages.
func isNotFound(err error) bool {
	var re *api.ResponseError
	return errors.As(err, &re) && re.StatusCode == http.StatusNotFound && len(re.Errors) == 0
}
