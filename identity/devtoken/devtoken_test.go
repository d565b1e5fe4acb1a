package devtoken_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/jonboulle/clockwork"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/devtoken"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var (
	td = spiffeid.RequireTrustDomainFromString("example.org")
	t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
)

// newAuthority returns an Authority with test defaults: the example.org
// trust domain, a fake clock at t0, a key file in a temporary directory and
// a discarded log.
func newAuthority(t *testing.T, cfg devtoken.Config) *devtoken.Authority {
	t.Helper()
	if cfg.TrustDomain.IsZero() {
		cfg.TrustDomain = td
	}
	if cfg.Clock == nil {
		cfg.Clock = clockwork.NewFakeClockAt(t0)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	a, err := devtoken.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return a
}

func keyFile(t *testing.T) string {
	return filepath.Join(t.TempDir(), "dev-token.key")
}

func mint(t *testing.T, a *devtoken.Authority, req devtoken.MintRequest) string {
	t.Helper()
	tok, err := a.Mint(req)
	if err != nil {
		t.Fatalf("Mint(%+v): %v", req, err)
	}
	return tok
}

func authenticate(a *devtoken.Authority, token, cluster string) (identity.Caller, error) {
	return a.Authenticate(context.Background(), identity.Credential{Token: token, ClusterID: cluster})
}

// readKey loads the signing key from an Authority's key file, so tests can
// sign arbitrary claims that Mint would refuse to produce.
func readKey(t *testing.T, path string) *ecdsa.PrivateKey {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatalf("%s: no PEM block", path)
	}
	key, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func sign(t *testing.T, alg jose.SignatureAlgorithm, key any, claims map[string]any) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	jws, err := signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// rawToken assembles a compact JWS by hand, for algorithms go-jose will not
// produce.
func rawToken(t *testing.T, header, claims map[string]any, signature func(signingInput string) []byte) string {
	t.Helper()
	enc := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	input := enc(header) + "." + enc(claims)
	return input + "." + base64.RawURLEncoding.EncodeToString(signature(input))
}

// claims returns a valid claim set for default/web at t0, which tests then
// break one field at a time.
func claims(mutate ...func(map[string]any)) map[string]any {
	c := map[string]any{
		"iss": "meshca-dev",
		"sub": "system:serviceaccount:default:web",
		"aud": []string{"meshca"},
		"exp": t0.Add(time.Hour).Unix(),
		"iat": t0.Unix(),
		"nbf": t0.Unix(),
		"jti": "test",
		"kubernetes.io": map[string]any{
			"namespace":      "default",
			"serviceaccount": map[string]any{"name": "web", "uid": "1234"},
		},
	}
	for _, m := range mutate {
		m(c)
	}
	return c
}

func TestMintAndAuthenticate(t *testing.T) {
	tests := []struct {
		name    string
		cfg     devtoken.Config
		req     devtoken.MintRequest
		cluster string
		want    identity.Caller
	}{
		{
			name: "service account",
			req:  devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"},
			want: identity.Caller{
				ID:        spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web"),
				Namespace: "default", ServiceAccount: "web",
				Expiry: t0.Add(devtoken.DefaultTTL),
			},
		},
		{
			name: "pod bound",
			req: devtoken.MintRequest{
				Namespace: "shop", ServiceAccount: "cart.api",
				PodName: "cart-7d9f", PodUID: "0b8c7e52-1f7a-4f0e-9c59-3b1b0d6f3c11", NodeName: "node-1",
			},
			want: identity.Caller{
				ID:        spiffeid.RequireFromString("spiffe://example.org/ns/shop/sa/cart.api"),
				Namespace: "shop", ServiceAccount: "cart.api",
				PodName: "cart-7d9f", PodUID: "0b8c7e52-1f7a-4f0e-9c59-3b1b0d6f3c11", NodeName: "node-1",
				Expiry: t0.Add(devtoken.DefaultTTL),
			},
		},
		{
			name: "explicit TTL",
			req:  devtoken.MintRequest{Namespace: "default", ServiceAccount: "web", TTL: 10 * time.Minute},
			want: identity.Caller{
				ID:        spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web"),
				Namespace: "default", ServiceAccount: "web",
				Expiry: t0.Add(10 * time.Minute),
			},
		},
		{
			name: "TTL capped at MaxTTL",
			cfg:  devtoken.Config{MaxTTL: 2 * time.Hour},
			req:  devtoken.MintRequest{Namespace: "default", ServiceAccount: "web", TTL: 48 * time.Hour},
			want: identity.Caller{
				ID:        spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web"),
				Namespace: "default", ServiceAccount: "web",
				Expiry: t0.Add(2 * time.Hour),
			},
		},
		{
			name: "one of several audiences matches",
			cfg:  devtoken.Config{Audiences: []string{"istio-ca", "meshca"}},
			req:  devtoken.MintRequest{Namespace: "default", ServiceAccount: "web", Audiences: []string{"other", "meshca"}},
			want: identity.Caller{
				ID:        spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web"),
				Namespace: "default", ServiceAccount: "web",
				Expiry: t0.Add(devtoken.DefaultTTL),
			},
		},
		{
			name: "custom issuer and trust domain",
			cfg:  devtoken.Config{Issuer: "https://dev.local", TrustDomain: spiffeid.RequireTrustDomainFromString("dev.local")},
			req:  devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"},
			want: identity.Caller{
				ID:        spiffeid.RequireFromString("spiffe://dev.local/ns/default/sa/web"),
				Namespace: "default", ServiceAccount: "web",
				Expiry: t0.Add(devtoken.DefaultTTL),
			},
		},
		{
			name:    "Istio default cluster",
			req:     devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"},
			cluster: "Kubernetes",
			want: identity.Caller{
				ID:        spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web"),
				Namespace: "default", ServiceAccount: "web",
				Expiry: t0.Add(devtoken.DefaultTTL),
			},
		},
		{
			name:    "configured cluster",
			cfg:     devtoken.Config{ClusterID: "east"},
			req:     devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"},
			cluster: "east",
			want: identity.Caller{
				ID:        spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/web"),
				Namespace: "default", ServiceAccount: "web",
				ClusterID: "east",
				Expiry:    t0.Add(devtoken.DefaultTTL),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newAuthority(t, tt.cfg)
			tok := mint(t, a, tt.req)
			got, err := authenticate(a, tok, tt.cluster)
			if err != nil {
				t.Fatalf("Authenticate: %v", err)
			}
			tt.want.TokenHash = identity.HashToken(tok)
			if !got.Expiry.Equal(tt.want.Expiry) {
				t.Errorf("Expiry = %v, want %v", got.Expiry, tt.want.Expiry)
			}
			got.Expiry, tt.want.Expiry = time.Time{}, time.Time{}
			if got != tt.want {
				t.Errorf("Authenticate =\n  %+v\nwant\n  %+v", got, tt.want)
			}
		})
	}
}

// TestTokenShape checks that minted tokens look like Kubernetes
// service-account tokens, which is the point of the package.
func TestTokenShape(t *testing.T) {
	a := newAuthority(t, devtoken.Config{})
	tok := mint(t, a, devtoken.MintRequest{
		Namespace: "default", ServiceAccount: "web", PodName: "web-1", PodUID: "pod-uid", NodeName: "node-1",
	})
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d parts, want 3", len(parts))
	}
	decode := func(s string, v any) {
		t.Helper()
		b, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatal(err)
		}
	}
	var header struct{ Alg, Typ, Kid string }
	decode(parts[0], &header)
	if header.Alg != "ES256" || header.Typ != "JWT" || header.Kid == "" {
		t.Errorf("header = %+v, want alg ES256, typ JWT and a kid", header)
	}
	var c struct {
		Iss, Sub, Jti string
		Aud           any
		Exp, Iat, Nbf int64
		K8s           struct {
			Namespace      string
			ServiceAccount struct{ Name, UID string }
			Pod            struct{ Name, UID string }
			Node           struct{ Name string }
		} `json:"kubernetes.io"`
	}
	decode(parts[1], &c)
	if c.Iss != "meshca-dev" || c.Sub != "system:serviceaccount:default:web" || c.Jti == "" {
		t.Errorf("iss, sub, jti = %q, %q, %q", c.Iss, c.Sub, c.Jti)
	}
	if c.Iat != t0.Unix() || c.Nbf != t0.Unix() || c.Exp != t0.Add(time.Hour).Unix() {
		t.Errorf("iat, nbf, exp = %d, %d, %d; want %d, %d, %d", c.Iat, c.Nbf, c.Exp, t0.Unix(), t0.Unix(), t0.Add(time.Hour).Unix())
	}
	k := c.K8s
	if k.Namespace != "default" || k.ServiceAccount.Name != "web" || k.ServiceAccount.UID == "" ||
		k.Pod.Name != "web-1" || k.Pod.UID != "pod-uid" || k.Node.Name != "node-1" {
		t.Errorf("kubernetes.io claim = %+v", k)
	}

	// The service account's UID is a property of the account, not the token.
	again := mint(t, a, devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"})
	decode(strings.Split(again, ".")[1], &c)
	if c.K8s.ServiceAccount.UID != k.ServiceAccount.UID {
		t.Errorf("service account UID changed between tokens: %q then %q", k.ServiceAccount.UID, c.K8s.ServiceAccount.UID)
	}
}

func TestAuthenticateFailures(t *testing.T) {
	kf := keyFile(t)
	a := newAuthority(t, devtoken.Config{KeyFile: kf})
	key := readKey(t, kf)
	other := newAuthority(t, devtoken.Config{})
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	valid := mint(t, a, devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"})
	// signed signs the valid claims, broken by mutate, with a's own key.
	signed := func(mutate func(map[string]any)) func(*testing.T) string {
		return func(t *testing.T) string { return sign(t, jose.ES256, key, claims(mutate)) }
	}

	tests := []struct {
		name    string
		token   func(t *testing.T) string
		cluster string
		want    identity.Reason
		msg     string // substring the operator needs to see
	}{
		{
			name:  "empty token",
			token: func(*testing.T) string { return "" },
			want:  identity.ReasonMissing,
			msg:   "no token",
		},
		{
			name:  "not a JWT",
			token: func(*testing.T) string { return "not-a-jwt" },
			want:  identity.ReasonInvalid,
			msg:   "parsing token",
		},
		{
			name:  "oversized",
			token: func(*testing.T) string { return strings.Repeat("a", 64<<10) },
			want:  identity.ReasonInvalid,
			msg:   "bytes",
		},
		{
			name: "signed by another authority",
			token: func(t *testing.T) string {
				return mint(t, other, devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"})
			},
			want: identity.ReasonInvalid,
			msg:  "verifying token",
		},
		{
			name: "tampered payload",
			token: func(t *testing.T) string {
				parts := strings.Split(valid, ".")
				forged, _ := json.Marshal(claims(func(c map[string]any) { c["sub"] = "system:serviceaccount:kube-system:admin" }))
				return parts[0] + "." + base64.RawURLEncoding.EncodeToString(forged) + "." + parts[2]
			},
			want: identity.ReasonInvalid,
			msg:  "verifying token",
		},
		{
			name: "alg none",
			token: func(t *testing.T) string {
				return rawToken(t, map[string]any{"alg": "none", "typ": "JWT"}, claims(), func(string) []byte { return nil })
			},
			want: identity.ReasonInvalid,
			msg:  "parsing token",
		},
		{
			name: "HS256 keyed with the public key",
			token: func(t *testing.T) string {
				pub, err := x509.MarshalPKIXPublicKey(a.PublicKey())
				if err != nil {
					t.Fatal(err)
				}
				return rawToken(t, map[string]any{"alg": "HS256", "typ": "JWT"}, claims(), func(in string) []byte {
					m := hmac.New(sha256.New, pub)
					m.Write([]byte(in))
					return m.Sum(nil)
				})
			},
			want: identity.ReasonInvalid,
			msg:  "HS256",
		},
		{
			name:  "ES384",
			token: func(t *testing.T) string { return sign(t, jose.ES384, p384, claims()) },
			want:  identity.ReasonInvalid,
			msg:   "ES384",
		},
		{
			name:  "wrong issuer",
			token: signed(func(c map[string]any) { c["iss"] = "kubernetes/serviceaccount" }),
			want:  identity.ReasonInvalid,
			msg:   `token issuer "kubernetes/serviceaccount" is not "meshca-dev"`,
		},
		{
			name:  "no expiry",
			token: signed(func(c map[string]any) { delete(c, "exp") }),
			want:  identity.ReasonInvalid,
			msg:   "no expiry",
		},
		{
			name:  "expired",
			token: signed(func(c map[string]any) { c["exp"] = t0.Add(-time.Minute).Unix() }),
			want:  identity.ReasonExpired,
			msg:   "expired at",
		},
		{
			name:  "not yet valid",
			token: signed(func(c map[string]any) { c["nbf"] = t0.Add(time.Minute).Unix() }),
			want:  identity.ReasonExpired,
			msg:   "not valid before",
		},
		{
			name:  "issued in the future",
			token: signed(func(c map[string]any) { c["iat"] = t0.Add(time.Minute).Unix() }),
			want:  identity.ReasonExpired,
			msg:   "issued in the future",
		},
		{
			name: "wrong audience",
			token: func(t *testing.T) string {
				return mint(t, a, devtoken.MintRequest{Namespace: "default", ServiceAccount: "web", Audiences: []string{"x"}})
			},
			want: identity.ReasonWrongAudience,
			msg:  `token audiences ["x"] do not include any of ["meshca"]`,
		},
		{
			name:  "no audience",
			token: signed(func(c map[string]any) { delete(c, "aud") }),
			want:  identity.ReasonWrongAudience,
			msg:   "do not include",
		},
		{
			name:  "user subject",
			token: signed(func(c map[string]any) { c["sub"] = "user:alice" }),
			want:  identity.ReasonNotServiceAccount,
			msg:   `"user:alice" is not a service account`,
		},
		{
			name:  "subject without service account",
			token: signed(func(c map[string]any) { c["sub"] = "system:serviceaccount:default" }),
			want:  identity.ReasonNotServiceAccount,
			msg:   "is not a service account",
		},
		{
			name:  "subject with extra segment",
			token: signed(func(c map[string]any) { c["sub"] = "system:serviceaccount:default:web:x" }),
			want:  identity.ReasonNotServiceAccount,
			msg:   "is not a service account",
		},
		{
			name:  "subject disagrees with kubernetes.io claim",
			token: signed(func(c map[string]any) { c["sub"] = "system:serviceaccount:kube-system:web" }),
			want:  identity.ReasonNotServiceAccount,
			msg:   "does not match its kubernetes.io claim",
		},
		{
			name:  "no kubernetes.io claim",
			token: signed(func(c map[string]any) { delete(c, "kubernetes.io") }),
			want:  identity.ReasonNotServiceAccount,
			msg:   "no kubernetes.io claim",
		},
		{
			name: "invalid namespace",
			token: signed(func(c map[string]any) {
				c["sub"] = "system:serviceaccount:Default:web"
				c["kubernetes.io"].(map[string]any)["namespace"] = "Default"
			}),
			want: identity.ReasonNotServiceAccount,
			msg:  "not a valid Kubernetes name",
		},
		{
			name:    "unknown cluster",
			token:   func(*testing.T) string { return valid },
			cluster: "west",
			want:    identity.ReasonUnknownCluster,
			msg:     `cluster "west" is not served`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok := tt.token(t)
			caller, err := authenticate(a, tok, tt.cluster)
			if err == nil {
				t.Fatalf("Authenticate succeeded with %+v, want %s", caller, tt.want)
			}
			if got := identity.ReasonOf(err); got != tt.want {
				t.Errorf("ReasonOf = %q, want %q (err: %v)", got, tt.want, err)
			}
			var ie *identity.Error
			if !errors.As(err, &ie) || ie.Reason != tt.want {
				t.Errorf("errors.As(%v) = %+v, want *identity.Error with reason %q", err, ie, tt.want)
			}
			if caller != (identity.Caller{}) {
				t.Errorf("failed Authenticate returned caller %+v, want zero", caller)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q does not contain %q", err, tt.msg)
			}
			if tok != "" && strings.Contains(err.Error(), tok) {
				t.Errorf("error %q contains the token", err)
			}
		})
	}
}

func TestExpiry(t *testing.T) {
	tests := []struct {
		name    string
		advance time.Duration
		want    identity.Reason
	}{
		{name: "fresh", advance: 0},
		{name: "just before expiry", advance: time.Hour - time.Second},
		{name: "within leeway", advance: time.Hour + 29*time.Second},
		{name: "past leeway", advance: time.Hour + 31*time.Second, want: identity.ReasonExpired},
		{name: "long expired", advance: 48 * time.Hour, want: identity.ReasonExpired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := clockwork.NewFakeClockAt(t0)
			a := newAuthority(t, devtoken.Config{Clock: clock})
			tok := mint(t, a, devtoken.MintRequest{Namespace: "default", ServiceAccount: "web", TTL: time.Hour})
			clock.Advance(tt.advance)
			_, err := authenticate(a, tok, "")
			if got := identity.ReasonOf(err); got != tt.want {
				t.Errorf("after %v: reason %q, want %q (err: %v)", tt.advance, got, tt.want, err)
			}
		})
	}
}

func TestNotYetValid(t *testing.T) {
	tests := []struct {
		name string
		skew time.Duration // how far the minter's clock runs ahead
		want identity.Reason
	}{
		{name: "same time", skew: 0},
		{name: "within leeway", skew: 29 * time.Second},
		{name: "past leeway", skew: 31 * time.Second, want: identity.ReasonExpired},
		{name: "far future", skew: time.Hour, want: identity.ReasonExpired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kf := keyFile(t)
			minter := newAuthority(t, devtoken.Config{KeyFile: kf, Clock: clockwork.NewFakeClockAt(t0.Add(tt.skew))})
			verifier := newAuthority(t, devtoken.Config{KeyFile: kf, Clock: clockwork.NewFakeClockAt(t0)})
			tok := mint(t, minter, devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"})
			_, err := authenticate(verifier, tok, "")
			if got := identity.ReasonOf(err); got != tt.want {
				t.Errorf("reason %q, want %q (err: %v)", got, tt.want, err)
			}
		})
	}
}

func TestClusterID(t *testing.T) {
	tests := []struct {
		configured, presented string
		want                  identity.Reason
	}{
		{configured: "", presented: ""},
		{configured: "", presented: "Kubernetes"},
		{configured: "", presented: "east", want: identity.ReasonUnknownCluster},
		{configured: "east", presented: ""},
		{configured: "east", presented: "east"},
		{configured: "east", presented: "Kubernetes", want: identity.ReasonUnknownCluster},
		{configured: "east", presented: "west", want: identity.ReasonUnknownCluster},
	}
	for _, tt := range tests {
		t.Run(tt.configured+"/"+tt.presented, func(t *testing.T) {
			a := newAuthority(t, devtoken.Config{ClusterID: tt.configured})
			tok := mint(t, a, devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"})
			caller, err := authenticate(a, tok, tt.presented)
			if got := identity.ReasonOf(err); got != tt.want {
				t.Fatalf("reason %q, want %q (err: %v)", got, tt.want, err)
			}
			if err == nil && caller.ClusterID != tt.configured {
				t.Errorf("Caller.ClusterID = %q, want %q", caller.ClusterID, tt.configured)
			}
		})
	}
}

func TestMintErrors(t *testing.T) {
	tests := []struct {
		name string
		req  devtoken.MintRequest
	}{
		{name: "empty namespace", req: devtoken.MintRequest{ServiceAccount: "web"}},
		{name: "empty service account", req: devtoken.MintRequest{Namespace: "default"}},
		{name: "uppercase namespace", req: devtoken.MintRequest{Namespace: "Default", ServiceAccount: "web"}},
		{name: "colon in service account", req: devtoken.MintRequest{Namespace: "default", ServiceAccount: "web:admin"}},
		{name: "negative TTL", req: devtoken.MintRequest{Namespace: "default", ServiceAccount: "web", TTL: -time.Second}},
	}
	a := newAuthority(t, devtoken.Config{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok, err := a.Mint(tt.req)
			if err == nil {
				t.Fatalf("Mint(%+v) = %q, want error", tt.req, tok)
			}
			if !strings.HasPrefix(err.Error(), "devtoken: ") {
				t.Errorf("error %q lacks the devtoken: prefix", err)
			}
		})
	}
}

func TestNewErrors(t *testing.T) {
	writeKey := func(t *testing.T, data []byte) string {
		t.Helper()
		path := keyFile(t)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	pemOf := func(typ string, der []byte) []byte {
		return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p384DER, err := x509.MarshalECPrivateKey(p384)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name string
		cfg  func(t *testing.T) devtoken.Config
		msg  string
		// badKey marks an unusable key file, which must be named in the
		// error and left untouched.
		badKey bool
	}{
		{
			name: "no trust domain",
			cfg:  func(*testing.T) devtoken.Config { return devtoken.Config{} },
			msg:  "trust domain is required",
		},
		{
			name: "negative max TTL",
			cfg:  func(*testing.T) devtoken.Config { return devtoken.Config{TrustDomain: td, MaxTTL: -time.Hour} },
			msg:  "negative",
		},
		{
			name: "empty audience",
			cfg: func(*testing.T) devtoken.Config {
				return devtoken.Config{TrustDomain: td, Audiences: []string{"meshca", ""}}
			},
			msg: "audiences",
		},
		{
			name: "garbage key file",
			cfg: func(t *testing.T) devtoken.Config {
				return devtoken.Config{TrustDomain: td, KeyFile: writeKey(t, []byte("not a key"))}
			},
			msg:    "no PEM block found",
			badKey: true,
		},
		{
			name: "empty key file",
			cfg: func(t *testing.T) devtoken.Config {
				return devtoken.Config{TrustDomain: td, KeyFile: writeKey(t, nil)}
			},
			msg:    "no PEM block found",
			badKey: true,
		},
		{
			name: "wrong PEM type",
			cfg: func(t *testing.T) devtoken.Config {
				return devtoken.Config{TrustDomain: td, KeyFile: writeKey(t, pemOf("CERTIFICATE", []byte{1, 2, 3}))}
			},
			msg:    `PEM block is "CERTIFICATE"`,
			badKey: true,
		},
		{
			name: "truncated key",
			cfg: func(t *testing.T) devtoken.Config {
				return devtoken.Config{TrustDomain: td, KeyFile: writeKey(t, pemOf("EC PRIVATE KEY", []byte{0x30, 0x03, 0x02}))}
			},
			msg:    "parsing EC private key",
			badKey: true,
		},
		{
			name: "P-384 key",
			cfg: func(t *testing.T) devtoken.Config {
				return devtoken.Config{TrustDomain: td, KeyFile: writeKey(t, pemOf("EC PRIVATE KEY", p384DER))}
			},
			msg:    "want P-256",
			badKey: true,
		},
		{
			name: "key file is a directory",
			cfg: func(t *testing.T) devtoken.Config {
				return devtoken.Config{TrustDomain: td, KeyFile: t.TempDir()}
			},
			msg: "reading key file",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg(t)
			cfg.Logger = slog.New(slog.DiscardHandler)
			var before []byte
			if cfg.KeyFile != "" {
				before, _ = os.ReadFile(cfg.KeyFile)
			}
			a, err := devtoken.New(cfg)
			if err == nil {
				t.Fatalf("New = %v, want error", a)
			}
			if !strings.HasPrefix(err.Error(), "devtoken: ") || !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q, want devtoken: prefix and %q", err, tt.msg)
			}
			if tt.badKey {
				if !strings.Contains(err.Error(), cfg.KeyFile) {
					t.Errorf("error %q does not name the key file", err)
				}
				// A bad key must be reported, never silently replaced.
				if after, _ := os.ReadFile(cfg.KeyFile); !bytes.Equal(before, after) {
					t.Error("New modified an unusable key file")
				}
			}
		})
	}
}

func TestKeyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "dev-token.key")
	first := newAuthority(t, devtoken.Config{KeyFile: path})

	info, err := os.Stat(path)
	if err != nil {
		t.Fatalf("key file not created: %v", err)
	}
	if mode := info.Mode().Perm(); mode != 0o600 {
		t.Errorf("key file mode = %v, want 0600", mode)
	}
	created, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Errorf("key directory holds %d entries, want only the key (temp file left behind?)", len(entries))
	}

	second := newAuthority(t, devtoken.Config{KeyFile: path})
	if reloaded, _ := os.ReadFile(path); !bytes.Equal(created, reloaded) {
		t.Error("second New rewrote the key file")
	}
	if !first.PublicKey().(*ecdsa.PublicKey).Equal(second.PublicKey()) {
		t.Error("second New loaded a different key")
	}
	tok := mint(t, first, devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"})
	caller, err := authenticate(second, tok, "")
	if err != nil {
		t.Fatalf("token from first instance rejected by second: %v", err)
	}
	if got, want := caller.ID.String(), "spiffe://example.org/ns/default/sa/web"; got != want {
		t.Errorf("ID = %s, want %s", got, want)
	}
}

func TestKeyFilePKCS8(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	path := keyFile(t)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	a := newAuthority(t, devtoken.Config{KeyFile: path})
	if !key.PublicKey.Equal(a.PublicKey()) {
		t.Error("PKCS #8 key not loaded")
	}
}

func TestWarnsOnce(t *testing.T) {
	var buf bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	a := newAuthority(t, devtoken.Config{Logger: logger})
	tok := mint(t, a, devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"})
	if _, err := authenticate(a, tok, ""); err != nil {
		t.Fatal(err)
	}
	authenticate(a, "", "")

	var records []map[string]any
	dec := json.NewDecoder(&buf)
	for {
		var r map[string]any
		if err := dec.Decode(&r); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		records = append(records, r)
	}
	if len(records) != 1 {
		t.Fatalf("logged %d records, want 1: %v", len(records), records)
	}
	msg, _ := records[0]["msg"].(string)
	if records[0]["level"] != "WARN" || !strings.Contains(msg, "development") || !strings.Contains(msg, "production") {
		t.Errorf("record = %v, want a WARN about development-only use", records[0])
	}
	if strings.Contains(buf.String(), tok) {
		t.Error("log contains a token")
	}
}

func TestConcurrentUse(t *testing.T) {
	a := newAuthority(t, devtoken.Config{})
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 20 {
				tok, err := a.Mint(devtoken.MintRequest{Namespace: "default", ServiceAccount: "web"})
				if err != nil {
					t.Error(err)
					return
				}
				if _, err := authenticate(a, tok, ""); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}
