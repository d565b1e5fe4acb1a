package vault

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/jonboulle/clockwork"
)

// Defaults for the zero values of Config and the Auth types.
const (
	DefaultMount               = "transit"
	DefaultRequestTimeout      = 10 * time.Second
	DefaultAppRoleMount        = "approle"
	DefaultKubernetesMount     = "kubernetes"
	DefaultKubernetesTokenFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"
)

// Config configures a Vault store.
type Config struct {
	// Address is Vault's URL, such as https://vault.example:8200. Plain
	// http is accepted only for a loopback host (a local Vault Agent or a
	// development server): the token travels with every request.
	Address string
	// Mount is the path of the Transit secrets engine; default "transit".
	Mount string
	// KeyPrefix is put in front of every Transit key name, so that several
	// CAs can share a mount and a policy can be scoped to meshca's keys.
	// Empty, or it starts with a letter, digit or underscore and continues
	// with those, '.' and '-'.
	KeyPrefix string
	// Namespace is the Vault Enterprise namespace, sent as
	// X-Vault-Namespace with every request; empty sends none.
	Namespace string
	// TLS verifies Vault's certificate. There is deliberately no way to
	// skip verification.
	TLS TLSConfig
	// Auth is how the store logs in: TokenAuth, AppRoleAuth or
	// KubernetesAuth. Required.
	Auth Auth
	// RequestTimeout bounds each request that has no caller's context:
	// every Sign (crypto.Signer passes none), and the logins and token
	// renewals of Run. Default 10 s.
	RequestTimeout time.Duration
	// Logger receives logins, renewals and their failures. Nil discards.
	Logger *slog.Logger
	// Clock paces Run's retries of failed logins; nil is the real clock.
	Clock clockwork.Clock
	// Metrics records signatures and logins; nil keeps unregistered ones.
	Metrics *Metrics
}

// TLSConfig verifies Vault's serving certificate.
type TLSConfig struct {
	// CAFile is a PEM bundle of the CAs that may sign Vault's certificate;
	// empty uses the system roots.
	CAFile string
	// ServerName is the name expected in Vault's certificate, when it
	// differs from the host in Address (for example an IP address).
	ServerName string
}

// prefixPattern keeps Transit key names valid: Vault's names start and end
// with a word character and hold only word characters, '.' and '-'. Ids
// start alphanumeric and the type suffix ends with a digit, so only the
// prefix's first character needs care.
var prefixPattern = regexp.MustCompile(`^([a-zA-Z0-9_][a-zA-Z0-9_.-]*)?$`)

func (c *Config) validate() error {
	if c.Address == "" {
		return errors.New("keystore/vault: no Address configured")
	}
	u, err := url.Parse(c.Address)
	if err != nil {
		return fmt.Errorf("keystore/vault: Address: %w", err)
	}
	switch u.Scheme {
	case "https":
	case "http":
		if !isLoopback(u.Hostname()) {
			return fmt.Errorf("keystore/vault: Address %s: plain http is allowed only to a loopback host; use https", c.Address)
		}
	default:
		return fmt.Errorf("keystore/vault: Address %s: scheme must be https (or http to a loopback host)", c.Address)
	}
	if u.Host == "" {
		return fmt.Errorf("keystore/vault: Address %s has no host", c.Address)
	}
	c.Mount = strings.Trim(c.Mount, "/")
	if c.Mount == "" {
		c.Mount = DefaultMount
	}
	if !prefixPattern.MatchString(c.KeyPrefix) {
		return fmt.Errorf("keystore/vault: KeyPrefix %q: want [a-zA-Z0-9_] followed by [a-zA-Z0-9_.-]", c.KeyPrefix)
	}
	// Pointers work as well as values; the store keeps values.
	switch a := c.Auth.(type) {
	case *TokenAuth:
		c.Auth = derefAuth(a)
	case *AppRoleAuth:
		c.Auth = derefAuth(a)
	case *KubernetesAuth:
		c.Auth = derefAuth(a)
	}
	if c.Auth == nil {
		return errors.New("keystore/vault: no Auth configured (TokenAuth, AppRoleAuth or KubernetesAuth)")
	}
	if err := c.Auth.validate(); err != nil {
		return fmt.Errorf("keystore/vault: %s auth: %w", c.Auth.method(), err)
	}
	if c.RequestTimeout < 0 {
		return fmt.Errorf("keystore/vault: negative RequestTimeout %v", c.RequestTimeout)
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Clock == nil {
		c.Clock = clockwork.NewRealClock()
	}
	if c.Metrics == nil {
		c.Metrics = NewMetrics(nil)
	}
	return nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// derefAuth returns *a, or nil for a nil pointer.
func derefAuth[T Auth](a *T) Auth {
	if a == nil {
		return nil
	}
	return *a
}
