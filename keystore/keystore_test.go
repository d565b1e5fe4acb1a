package keystore_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/meshca/meshca/keystore"
)

func TestParseKeyType(t *testing.T) {
	for _, tt := range []struct {
		in      string
		want    keystore.KeyType
		wantErr bool
	}{
		{in: "ecdsa-p256", want: keystore.ECDSAP256},
		{in: "ecdsa-p384", want: keystore.ECDSAP384},
		{in: "rsa-2048", want: keystore.RSA2048},
		{in: "rsa-3072", want: keystore.RSA3072},
		{in: "rsa-4096", want: keystore.RSA4096},
		{in: "", wantErr: true},
		{in: "ECDSA-P256", wantErr: true},
		{in: " ecdsa-p256", wantErr: true},
		{in: "ecdsa-p521", wantErr: true},
		{in: "rsa-1024", wantErr: true},
		{in: "ed25519", wantErr: true},
	} {
		t.Run(tt.in, func(t *testing.T) {
			got, err := keystore.ParseKeyType(tt.in)
			if tt.wantErr {
				if !errors.Is(err, keystore.ErrUnsupportedKeyType) {
					t.Fatalf("ParseKeyType(%q) = %q, %v; want keystore.ErrUnsupportedKeyType", tt.in, got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseKeyType(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
			}
		})
	}
}

func TestParseKeyTypeRoundTrip(t *testing.T) {
	for _, kt := range keystore.KeyTypes {
		if got, err := keystore.ParseKeyType(string(kt)); err != nil || got != kt {
			t.Errorf("ParseKeyType(%q) = %q, %v", kt, got, err)
		}
	}
}

func TestValidateID(t *testing.T) {
	for _, tt := range []struct {
		id    string
		valid bool
	}{
		{"a", true},
		{"0", true},
		{"ca", true},
		{"ca-2025.01_x", true},
		{"Intermediate.CA", true},
		{strings.Repeat("a", 128), true},
		{"", false},
		{strings.Repeat("a", 129), false},
		{".", false},
		{"..", false},
		{"../x", false},
		{"a/b", false},
		{`a\b`, false},
		{".hidden", false},
		{"-flag", false},
		{"_a", false},
		{"a b", false},
		{"a\n", false},
		{"a\x00", false},
		{"ключ", false},
	} {
		t.Run(tt.id, func(t *testing.T) {
			err := keystore.ValidateID(tt.id)
			if tt.valid && err != nil {
				t.Fatalf("ValidateID(%q) = %v, want nil", tt.id, err)
			}
			if !tt.valid && !errors.Is(err, keystore.ErrInvalidID) {
				t.Fatalf("ValidateID(%q) = %v, want keystore.ErrInvalidID", tt.id, err)
			}
		})
	}
}

func TestGenerateUnsupported(t *testing.T) {
	if _, err := keystore.Generate("ed25519"); !errors.Is(err, keystore.ErrUnsupportedKeyType) {
		t.Fatalf("Generate(ed25519) = %v, want keystore.ErrUnsupportedKeyType", err)
	}
}
