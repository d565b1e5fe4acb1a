package vault

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/api/auth/approle"
	"github.com/hashicorp/vault/api/auth/kubernetes"
)

// Auth is a way to log in to Vault: TokenAuth, AppRoleAuth or
// KubernetesAuth.
type Auth interface {
	method() string
	validate() error
	// login returns a fresh login's response; c holds no token.
	login(ctx context.Context, c *api.Client) (*api.Secret, error)
}

// TokenAuth uses a Vault token as given. Run renews it while Vault allows;
// a token that reaches its maximum TTL cannot be replaced, so prefer a
// periodic token, or AppRole or Kubernetes login.
type TokenAuth struct {
	Token string
}

// AppRoleAuth logs in with an AppRole role ID and a secret ID.
type AppRoleAuth struct {
	// Mount is the AppRole auth method's path; default "approle".
	Mount string
	// RoleID is the role's ID.
	RoleID string
	// SecretIDFile holds the secret ID. It is read at every login, so it
	// can be replaced while meshca runs.
	SecretIDFile string
}

// KubernetesAuth logs in with a Kubernetes service account token, which
// Vault checks with a TokenReview.
type KubernetesAuth struct {
	// Mount is the Kubernetes auth method's path; default "kubernetes".
	Mount string
	// Role is the Vault role bound to meshca's service account.
	Role string
	// TokenFile holds the service account token; default the one the
	// kubelet mounts into every pod. It is read at every login, because
	// the kubelet rotates projected tokens.
	TokenFile string
}

func (TokenAuth) method() string      { return "token" }
func (AppRoleAuth) method() string    { return "approle" }
func (KubernetesAuth) method() string { return "kubernetes" }

func (a TokenAuth) validate() error {
	if a.Token == "" {
		return errors.New("empty token")
	}
	return nil
}

func (a AppRoleAuth) validate() error {
	if a.RoleID == "" || a.SecretIDFile == "" {
		return errors.New("RoleID and SecretIDFile are required")
	}
	return nil
}

func (a KubernetesAuth) validate() error {
	if a.Role == "" {
		return errors.New("no Role configured")
	}
	return nil
}

// login is never called for a token: there is nothing to log in with.
func (TokenAuth) login(context.Context, *api.Client) (*api.Secret, error) {
	return nil, errors.New("a token needs no login")
}

func (a AppRoleAuth) login(ctx context.Context, c *api.Client) (*api.Secret, error) {
	m, err := approle.NewAppRoleAuth(a.RoleID, &approle.SecretID{FromFile: a.SecretIDFile},
		approle.WithMountPath(cmp.Or(a.Mount, DefaultAppRoleMount)))
	if err != nil {
		return nil, err
	}
	return m.Login(ctx, c)
}

func (a KubernetesAuth) login(ctx context.Context, c *api.Client) (*api.Secret, error) {
	// The library reads the token file when the method is built, so it is
	// built anew for every login.
	m, err := kubernetes.NewKubernetesAuth(a.Role,
		kubernetes.WithServiceAccountTokenPath(cmp.Or(a.TokenFile, DefaultKubernetesTokenFile)),
		kubernetes.WithMountPath(cmp.Or(a.Mount, DefaultKubernetesMount)))
	if err != nil {
		return nil, err
	}
	return m.Login(ctx, c)
}

// Bounds of the wait between failed logins in Run.
const (
	minRetry = time.Second
	maxRetry = time.Minute
)

// ready logs in if no login has happened yet, so the store works without
// Run until the first token expires.
func (s *Store) ready(ctx context.Context) error {
	if s.loggedIn.Load() {
		return nil
	}
	s.loginMu.Lock()
	defer s.loginMu.Unlock()
	if s.loggedIn.Load() {
		return nil
	}
	_, err := s.login(ctx)
	return err
}

// relogin logs in whether or not a login exists: the current token is
// nearing its end, or Check wants the credentials proven now.
func (s *Store) relogin(ctx context.Context) (*api.Secret, error) {
	s.loginMu.Lock()
	defer s.loginMu.Unlock()
	return s.login(ctx)
}

// reloginUnless logs in again unless the token in use is no longer stale,
// the one a request failed with: concurrent signers that all met the same
// expired token log in once. A fixed token cannot be renewed this way.
func (s *Store) reloginUnless(ctx context.Context, stale string) error {
	if s.auth.method() == (TokenAuth{}).method() {
		return errors.New("a fixed token cannot be replaced")
	}
	s.loginMu.Lock()
	defer s.loginMu.Unlock()
	if s.client.Token() != stale {
		return nil
	}
	_, err := s.login(ctx)
	return err
}

// expiredToken reports a request refused because its token is no longer
// valid (Vault: 403 "invalid token").
func expiredToken(err error) bool {
	var re *api.ResponseError
	if !errors.As(err, &re) || re.StatusCode != http.StatusForbidden {
		return false
	}
	for _, e := range re.Errors {
		if strings.Contains(e, "invalid token") {
			return true
		}
	}
	return false
}

// login logs in and installs the new token. Requests already sent keep
// the old token, which stays valid until its own expiry, so signing is not
// interrupted. The caller holds loginMu.
func (s *Store) login(ctx context.Context) (*api.Secret, error) {
	method := s.auth.method()
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	secret, err := s.auth.login(ctx, s.loginClient)
	if err == nil && (secret == nil || secret.Auth == nil || secret.Auth.ClientToken == "") {
		err = errors.New("no token in the login response")
	}
	if err != nil {
		s.metrics.logins.WithLabelValues(method, "error").Inc()
		return nil, loginError("log in with "+method+" auth", err)
	}
	s.client.SetToken(secret.Auth.ClientToken)
	s.secret = secret
	s.loggedIn.Store(true)
	s.metrics.logins.WithLabelValues(method, "ok").Inc()
	s.log.Info("Logged in to Vault", "method", method,
		"ttl", time.Duration(secret.Auth.LeaseDuration)*time.Second, "renewable", secret.Auth.Renewable)
	return secret, nil
}

// loginError marks a login that Vault rejected as refused: the
// credentials, role or method are wrong, and retrying the same ones will
// not help. Vault answers 400 for a wrong AppRole secret ID or Kubernetes
// role, 403 for a token it does not accept or an auth mount that is not
// there. Rate limiting (429) is not a refusal.
func loginError(op string, err error) error {
	var re *api.ResponseError
	if errors.As(err, &re) && (re.StatusCode == http.StatusBadRequest || re.StatusCode == http.StatusUnauthorized || re.StatusCode == http.StatusForbidden) {
		return fmt.Errorf("%w: %s: %w", ErrLoginRefused, op, &responseError{re})
	}
	return wrap(op, err)
}

// lookupSelf asks Vault about the configured token, as a lease for the
// lifetime watcher.
func (s *Store) lookupSelf(ctx context.Context) (*api.Secret, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	info, err := s.client.Auth().Token().LookupSelfWithContext(ctx)
	if err != nil {
		// Vault adds "invalid token" when it does not know the token, which
		// tells a refused token from one without auth/token/lookup-self.
		return nil, wrap("token lookup", err)
	}
	ttl, err := info.TokenTTL()
	if err != nil {
		return nil, fmt.Errorf("keystore/vault: token lookup: %w", err)
	}
	renewable, err := info.TokenIsRenewable()
	if err != nil {
		return nil, fmt.Errorf("keystore/vault: token lookup: %w", err)
	}
	return &api.Secret{Auth: &api.SecretAuth{
		ClientToken:   s.client.Token(),
		Renewable:     renewable,
		LeaseDuration: int(ttl / time.Second),
	}}, nil
}

// Run keeps the store's Vault token alive until ctx ends: it renews the
// token while Vault allows, and when the token reaches its maximum TTL or
// renewal fails, logs in again before it expires. Failed logins are retried
// with backoff. With TokenAuth there is nothing to log in with: Run returns
// an error once the token cannot be renewed any further. Run returns nil
// when ctx ends.
func (s *Store) Run(ctx context.Context) error {
	if _, ok := s.auth.(TokenAuth); ok {
		return s.runToken(ctx)
	}
	s.loginMu.Lock()
	secret := s.secret
	s.loginMu.Unlock()
	retry := minRetry
	for {
		if secret == nil {
			var err error
			if secret, err = s.relogin(ctx); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				s.log.Warn("Vault login failed; retrying", "err", err, "in", retry)
				if !s.sleep(ctx, retry) {
					return nil
				}
				retry = min(2*retry, maxRetry)
				continue
			}
			retry = minRetry
		}
		if secret.Auth.LeaseDuration <= 0 {
			// The token never expires (a TTL of 0, as for a root token).
			<-ctx.Done()
			return nil
		}
		err := s.watch(ctx, secret)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			s.log.Warn("Vault token renewal failed; logging in again", "err", err)
		} else {
			s.log.Info("Vault token is near its maximum TTL; logging in again")
		}
		secret = nil
	}
}

func (s *Store) runToken(ctx context.Context) error {
	retry := minRetry
	for {
		secret, err := s.lookupSelf(ctx)
		switch {
		case ctx.Err() != nil:
			return nil
		case errors.Is(err, ErrLoginRefused):
			return err // expired or revoked: retrying cannot help
		case err != nil:
			s.log.Warn("Vault token lookup failed; retrying", "err", err, "in", retry)
			if !s.sleep(ctx, retry) {
				return nil
			}
			retry = min(2*retry, maxRetry)
			continue
		}
		retry = minRetry
		if secret.Auth.LeaseDuration <= 0 {
			<-ctx.Done()
			return nil
		}
		err = s.watch(ctx, secret)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			// Renewal kept failing until the lease ran out; the lookup
			// tells whether the token is gone.
			s.log.Warn("Vault token renewal failed", "err", err)
			continue
		}
		return errors.New("keystore/vault: the Vault token is near its maximum TTL and cannot be renewed; use a periodic token, or AppRole or Kubernetes login")
	}
}

// watch renews secret's token with the api's lifetime watcher until the
// watcher gives up or ctx ends. It returns nil when the token can no longer
// be extended, and the renewal error when renewing failed.
func (s *Store) watch(ctx context.Context, secret *api.Secret) error {
	w, err := s.client.NewLifetimeWatcher(&api.LifetimeWatcherInput{Secret: secret})
	if err != nil {
		return fmt.Errorf("keystore/vault: %w", err)
	}
	go w.Start()
	for {
		select {
		case <-ctx.Done():
			w.Stop()
			<-w.DoneCh() // Start has returned: nothing is left running
			return ctx.Err()
		case err := <-w.DoneCh():
			return err
		case r := <-w.RenewCh():
			s.metrics.renewals.Inc()
			if r.Secret != nil && r.Secret.Auth != nil {
				s.log.Debug("Renewed Vault token", "ttl", time.Duration(r.Secret.Auth.LeaseDuration)*time.Second)
			}
		}
	}
}

// sleep waits d on the store's clock; it reports false if ctx ended first.
func (s *Store) sleep(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-s.clock.After(d):
		return true
	}
}
