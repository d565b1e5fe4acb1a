package vault

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/jonboulle/clockwork"

	"github.com/meshca/meshca/keystore"
)

var (
	_ keystore.Store   = (*Store)(nil)
	_ keystore.Deleter = (*Store)(nil)
)

// keySpecs are the key types Transit can hold, with what their public keys
// must be.
var keySpecs = map[keystore.KeyType]struct {
	curve elliptic.Curve
	bits  int
}{
	keystore.ECDSAP256: {curve: elliptic.P256()},
	keystore.ECDSAP384: {curve: elliptic.P384()},
	keystore.RSA2048:   {bits: 2048},
	keystore.RSA3072:   {bits: 3072},
	keystore.RSA4096:   {bits: 4096},
}

// Store keeps keys in Vault Transit. It is safe for concurrent use.
type Store struct {
	client      *api.Client // carries the current token
	loginClient *api.Client // never carries a token: logins must not send a stale one
	addr        string
	mount       string
	prefix      string
	auth        Auth
	timeout     time.Duration
	log         *slog.Logger
	clock       clockwork.Clock
	metrics     *Metrics

	loginMu  sync.Mutex  // serialises logins
	secret   *api.Secret // the current login's response; guarded by loginMu
	loggedIn atomic.Bool // a token is installed in client
}

// New returns a store for cfg. It reads the CA file but contacts nothing
// and starts nothing: the first operation logs in, Check probes Vault, and
// Run keeps the token alive.
func New(cfg Config) (*Store, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: cfg.TLS.ServerName}
	if cfg.TLS.CAFile != "" {
		pemData, err := os.ReadFile(cfg.TLS.CAFile)
		if err != nil {
			return nil, fmt.Errorf("keystore/vault: TLS CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemData) {
			return nil, fmt.Errorf("keystore/vault: TLS CA file %s holds no PEM certificates", cfg.TLS.CAFile)
		}
		tlsCfg.RootCAs = pool
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSClientConfig = tlsCfg
	// Built by hand rather than with api.DefaultConfig, which reads VAULT_*
	// variables: the environment must not redirect meshca's keys or turn
	// off certificate checks.
	apiCfg := &api.Config{
		Address: cfg.Address,
		HttpClient: &http.Client{
			Transport: transport,
			// The api follows Vault's redirects itself, once.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		Timeout:    cfg.RequestTimeout,
		MaxRetries: 2,
	}
	newClient := func() (*api.Client, error) {
		c, err := api.NewClient(apiCfg)
		if err != nil {
			return nil, fmt.Errorf("keystore/vault: %w", err)
		}
		// NewClient takes VAULT_TOKEN and VAULT_NAMESPACE from the
		// environment.
		c.ClearToken()
		c.ClearNamespace()
		if cfg.Namespace != "" {
			c.SetNamespace(cfg.Namespace)
		}
		return c, nil
	}
	client, err := newClient()
	if err != nil {
		return nil, err
	}
	loginClient, err := newClient()
	if err != nil {
		return nil, err
	}
	s := &Store{
		client:      client,
		loginClient: loginClient,
		addr:        cfg.Address,
		mount:       cfg.Mount,
		prefix:      cfg.KeyPrefix,
		auth:        cfg.Auth,
		timeout:     cfg.RequestTimeout,
		log:         cfg.Logger,
		clock:       cfg.Clock,
		metrics:     cfg.Metrics,
	}
	if t, ok := cfg.Auth.(TokenAuth); ok {
		client.SetToken(t.Token)
		s.loggedIn.Store(true)
	}
	return s, nil
}

// keyName is the Transit key holding id's keys of type kt. Each type has its
// own Transit key because a Transit key's type is fixed; GetKey chooses the
// current one. No two (id, type) pairs share a name: the type suffixes
// differ in their last characters, so the suffix determines the type and
// the rest the id.
func (s *Store) keyName(id string, kt keystore.KeyType) string {
	return s.prefix + id + "." + string(kt)
}

// keyInfo is what Transit reports about a key.
type keyInfo struct {
	Type                 string                     `json:"type"`
	LatestVersion        int                        `json:"latest_version"`
	Exportable           bool                       `json:"exportable"`
	AllowPlaintextBackup bool                       `json:"allow_plaintext_backup"`
	Keys                 map[string]json.RawMessage `json:"keys"`
}

type keyVersion struct {
	PublicKey    string    `json:"public_key"`
	CreationTime time.Time `json:"creation_time"`
}

type keyResponse struct {
	Data keyInfo `json:"data"`
}

// latest checks that the key is one meshca may use and returns its latest
// version.
func (k *keyInfo) latest(name string, kt keystore.KeyType) (keyVersion, error) {
	if k.Type != string(kt) {
		return keyVersion{}, fmt.Errorf("keystore/vault: Transit key %s has type %q, want %q", name, k.Type, kt)
	}
	if k.Exportable || k.AllowPlaintextBackup {
		return keyVersion{}, fmt.Errorf("%w: Transit key %s allows export or plaintext backup", ErrExportable, name)
	}
	raw, ok := k.Keys[strconv.Itoa(k.LatestVersion)]
	if !ok {
		return keyVersion{}, fmt.Errorf("keystore/vault: Transit key %s lacks its latest version %d", name, k.LatestVersion)
	}
	var v keyVersion
	if err := json.Unmarshal(raw, &v); err != nil {
		return keyVersion{}, fmt.Errorf("keystore/vault: Transit key %s version %d: %w", name, k.LatestVersion, err)
	}
	return v, nil
}

// GenerateKey implements keystore.Store. It rotates the Transit key for
// (id, kt) if it exists, or creates it, non-exportable, and returns a signer
// pinned to the resulting latest version: a later replacement does not
// change the key behind a signer already handed out. Two first calls for
// the same (id, kt) at once may both get version 1, which is then the
// stored key either way.
func (s *Store) GenerateKey(ctx context.Context, id string, kt keystore.KeyType) (crypto.Signer, error) {
	if err := keystore.ValidateID(id); err != nil {
		return nil, fmt.Errorf("keystore/vault: %w", err)
	}
	if _, ok := keySpecs[kt]; !ok {
		return nil, fmt.Errorf("keystore/vault: %w: %q", keystore.ErrUnsupportedKeyType, kt)
	}
	if err := s.ready(ctx); err != nil {
		return nil, err
	}
	name := s.keyName(id, kt)
	path := s.mount + "/keys/" + name
	existing, err := s.readKey(ctx, name)
	if err != nil {
		return nil, err
	}
	var resp keyResponse
	if existing != nil {
		// Never rotate a key meshca must not use, such as an exportable
		// one someone else created under this name.
		if _, err := existing.latest(name, kt); err != nil {
			return nil, err
		}
		if err := s.write(ctx, path+"/rotate", nil, &resp); err != nil {
			return nil, wrap("rotating Transit key "+name, err)
		}
	} else {
		// Transit's create leaves an existing key as it is, so a key
		// created by someone else since the read is checked below.
		err := s.write(ctx, path, map[string]any{
			"type":                   string(kt),
			"exportable":             false,
			"allow_plaintext_backup": false,
		}, &resp)
		if err != nil {
			return nil, wrap("creating Transit key "+name, err)
		}
	}
	// Vault answers under the key's lock, so the latest version in the
	// response is the one this call made.
	v, err := resp.Data.latest(name, kt)
	if err != nil {
		return nil, err
	}
	signer, err := s.newSigner(name, kt, resp.Data.LatestVersion, v)
	if err != nil {
		return nil, err
	}
	s.log.Info("Generated key in Vault", "id", id, "type", kt, "transit_key", name, "version", resp.Data.LatestVersion)
	return signer, nil
}

// GetKey implements keystore.Store. An id may have Transit keys of several
// types, left by GenerateKey calls with different types; the current key is
// the one whose latest version was made last. Older ones stay in Vault, so
// signers pinned to them keep working.
func (s *Store) GetKey(ctx context.Context, id string) (crypto.Signer, error) {
	if err := keystore.ValidateID(id); err != nil {
		return nil, fmt.Errorf("keystore/vault: %w", err)
	}
	if err := s.ready(ctx); err != nil {
		return nil, err
	}
	var (
		best    *keyInfo
		bestV   keyVersion
		bestKT  keystore.KeyType
		bestKey string
	)
	for _, kt := range keystore.KeyTypes {
		name := s.keyName(id, kt)
		info, err := s.readKey(ctx, name)
		if err != nil {
			return nil, err
		}
		if info == nil {
			continue
		}
		v, err := info.latest(name, kt)
		if err != nil {
			return nil, err
		}
		if best == nil || v.CreationTime.After(bestV.CreationTime) {
			best, bestV, bestKT, bestKey = info, v, kt, name
		}
	}
	if best == nil {
		return nil, fmt.Errorf("keystore/vault: %w: %q", keystore.ErrNotFound, id)
	}
	return s.newSigner(bestKey, bestKT, best.LatestVersion, bestV)
}

// DeleteKey implements keystore.Deleter: it deletes the Transit keys of
// every type under id. Transit deletes only keys marked deletable, so each
// is marked first; deleting an absent id succeeds.
func (s *Store) DeleteKey(ctx context.Context, id string) error {
	if err := keystore.ValidateID(id); err != nil {
		return fmt.Errorf("keystore/vault: %w", err)
	}
	if err := s.ready(ctx); err != nil {
		return err
	}
	for _, kt := range keystore.KeyTypes {
		name := s.keyName(id, kt)
		info, err := s.readKey(ctx, name)
		if err != nil {
			return err
		}
		if info == nil {
			continue
		}
		path := s.mount + "/keys/" + name
		if err := s.write(ctx, path+"/config", map[string]any{"deletion_allowed": true}, nil); err != nil {
			return wrap("allowing deletion of Transit key "+name, err)
		}
		if err := s.delete(ctx, path); err != nil && !isNotFound(err) {
			return wrap("deleting Transit key "+name, err)
		}
		s.log.Info("Deleted key in Vault", "id", id, "transit_key", name)
	}
	return nil
}

// readKey returns the Transit key name, or nil if it does not exist.
func (s *Store) readKey(ctx context.Context, name string) (*keyInfo, error) {
	var resp keyResponse
	err := s.read(ctx, s.mount+"/keys/"+name, &resp)
	if isNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, wrap("reading Transit key "+name, err)
	}
	return &resp.Data, nil
}

func (s *Store) newSigner(name string, kt keystore.KeyType, version int, v keyVersion) (*signer, error) {
	pub, err := parsePublicKey(v.PublicKey, kt)
	if err != nil {
		return nil, fmt.Errorf("keystore/vault: Transit key %s version %d: %w", name, version, err)
	}
	return &signer{s: s, name: name, version: version, pub: pub}, nil
}

// parsePublicKey decodes Transit's PEM public key and checks that it is of
// type kt.
func parsePublicKey(pemKey string, kt keystore.KeyType) (crypto.PublicKey, error) {
	block, _ := pem.Decode([]byte(pemKey))
	if block == nil {
		return nil, errors.New("public key is not PEM")
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("public key: %w", err)
	}
	spec := keySpecs[kt]
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		if spec.curve != pub.Curve {
			return nil, fmt.Errorf("public key is ECDSA %s, want %s", pub.Curve.Params().Name, kt)
		}
	case *rsa.PublicKey:
		if spec.bits != pub.N.BitLen() {
			return nil, fmt.Errorf("public key is RSA %d, want %s", pub.N.BitLen(), kt)
		}
	default:
		return nil, fmt.Errorf("public key of type %T, want %s", pub, kt)
	}
	return pub, nil
}

// read, write and delete send one request and decode the JSON response
// into out, if not nil. Reads and deletes are raw, which keeps Vault's
// status and error list intact for telling a missing key from a missing
// mount. Writes go through the api's parsed path: its raw write cancels the
// request's context before the body can be read.
func (s *Store) read(ctx context.Context, path string, out any) error {
	resp, err := s.client.Logical().ReadRawWithContext(ctx, path)
	if resp != nil {
		defer resp.Body.Close()
	}
	if err != nil || out == nil {
		return err
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decoding Vault's response: %w", err)
	}
	return nil
}

func (s *Store) write(ctx context.Context, path string, body map[string]any, out any) error {
	secret, err := s.client.Logical().WriteWithContext(ctx, path, body)
	if err != nil || out == nil {
		return err
	}
	if secret == nil {
		return errors.New("empty response from Vault")
	}
	// The api parsed the response into untyped maps; a round trip through
	// JSON types it.
	raw, err := json.Marshal(secret)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("decoding Vault's response: %w", err)
	}
	return nil
}

func (s *Store) delete(ctx context.Context, path string) error {
	resp, err := s.client.Logical().DeleteRawWithContext(ctx, path)
	if resp != nil {
		resp.Body.Close()
	}
	return err
}
