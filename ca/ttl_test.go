package ca_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/meshca/meshca/ca"
)

func TestLeafValidity(t *testing.T) {
	p := ca.DefaultTTLPolicy
	issuer := ca.Validity{NotBefore: start.Add(-time.Hour), NotAfter: start.Add(48 * time.Hour)}
	tests := []struct {
		name          string
		issuer        ca.Validity
		requested     time.Duration
		wantNotBefore time.Time
		wantNotAfter  time.Time
		wantClamped   bool
	}{
		{"default", issuer, 0, start.Add(-ca.Backdate), start.Add(time.Hour), false},
		{"negative is default", issuer, -time.Second, start.Add(-ca.Backdate), start.Add(time.Hour), false},
		{"requested", issuer, 6 * time.Hour, start.Add(-ca.Backdate), start.Add(6 * time.Hour), false},
		{"above max", issuer, 90 * 24 * time.Hour, start.Add(-ca.Backdate), start.Add(24 * time.Hour), true},
		{"issuer expires first", ca.Validity{NotBefore: issuer.NotBefore, NotAfter: start.Add(30 * time.Minute)}, 0, start.Add(-ca.Backdate), start.Add(30 * time.Minute), true},
		{"issuer just created", ca.Validity{NotBefore: start.Add(-10 * time.Second), NotAfter: issuer.NotAfter}, 0, start.Add(-10 * time.Second), start.Add(time.Hour), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v, clamped := p.LeafValidity(start, tc.requested, tc.issuer)
			if !v.NotBefore.Equal(tc.wantNotBefore) || !v.NotAfter.Equal(tc.wantNotAfter) || clamped != tc.wantClamped {
				t.Errorf("got %v..%v clamped=%v, want %v..%v clamped=%v", v.NotBefore, v.NotAfter, clamped, tc.wantNotBefore, tc.wantNotAfter, tc.wantClamped)
			}
		})
	}
}

func TestCheckCoverage(t *testing.T) {
	p := ca.DefaultTTLPolicy
	if err := p.CheckCoverage(start, start.Add(3*time.Hour), "x"); err != nil {
		t.Errorf("exactly 3 lifetimes refused: %v", err)
	}
	err := p.CheckCoverage(start, start.Add(2*time.Hour), "CN=old")
	var ce *ca.CoverageError
	if !errors.As(err, &ce) {
		t.Fatalf("err = %v, want *CoverageError", err)
	}
	for _, want := range []string{"CN=old", "expires in 2h0m0s", "3 × 1h0m0s = 3h0m0s", "lower the leaf TTL"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestTTLPolicyValidate(t *testing.T) {
	for _, p := range []ca.TTLPolicy{
		{Default: 0, Max: time.Hour, Coverage: 1},
		{Default: time.Hour, Max: time.Minute, Coverage: 1},
		{Default: time.Hour, Max: time.Hour, Coverage: 0},
	} {
		if err := p.Validate(); err == nil {
			t.Errorf("%+v accepted", p)
		}
	}
	if err := ca.DefaultTTLPolicy.Validate(); err != nil {
		t.Error(err)
	}
}

func TestRenewalPoint(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name                          string
		notBefore, notAfter, received time.Time
		frac                          float64
		want                          time.Time
	}{
		{"backdated leaf counts from receipt", t0.Add(-ca.Backdate), t0.Add(20 * time.Second), t0, 0.5, t0.Add(10 * time.Second)},
		{"received before NotBefore counts from NotBefore", t0, t0.Add(time.Hour), t0.Add(-time.Minute), 0.5, t0.Add(30 * time.Minute)},
		{"received late counts what is left", t0.Add(-ca.Backdate), t0.Add(time.Hour), t0.Add(20 * time.Minute), 0.5, t0.Add(40 * time.Minute)},
	} {
		if got := ca.RenewalPoint(tc.notBefore, tc.notAfter, tc.received, tc.frac); !got.Equal(tc.want) {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
}
