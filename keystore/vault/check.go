package vault

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/hashicorp/vault/api"

	"github.com/meshca/meshca/keystore"
)

// checkID is the key id whose paths Check asks about. Policies grant
// meshca's key prefix as a whole, so any id stands for all of them.
const checkID = "check"

// Check probes Vault the way the store will use it, so that a
// misconfiguration fails start-up rather than the first signature. It
// reports the first problem found, in this order, each matching its error
// with errors.Is: ErrUnreachable, ErrSealed, ErrLoginRefused (with AppRole
// or Kubernetes auth Check logs in, and the store keeps that token),
// ErrPermissionDenied (the policies lack a capability GenerateKey, GetKey or
// Sign needs) and ErrMountMissing.
func (s *Store) Check(ctx context.Context) error {
	health, err := s.client.Sys().HealthWithContext(ctx)
	if err != nil {
		var re *api.ResponseError
		if errors.As(err, &re) {
			err = &responseError{re}
		}
		return fmt.Errorf("%w: %s: %w", ErrUnreachable, s.addr, err)
	}
	switch {
	case !health.Initialized:
		return fmt.Errorf("%w: %s is not initialized", ErrSealed, s.addr)
	case health.Sealed:
		return fmt.Errorf("%w: %s", ErrSealed, s.addr)
	}
	if _, ok := s.auth.(TokenAuth); ok {
		if _, err := s.lookupSelf(ctx); err != nil {
			return err
		}
	} else if _, err := s.relogin(ctx); err != nil {
		return err
	}
	if err := s.checkCapabilities(ctx); err != nil {
		return err
	}
	return s.checkMount(ctx)
}

// checkCapabilities asks Vault which of the capabilities the store needs
// the token's policies grant. Capabilities are computed from the policies
// alone, so a missing mount does not show here.
func (s *Store) checkCapabilities(ctx context.Context) error {
	name := s.keyName(checkID, keystore.ECDSAP256)
	need := []struct {
		path string
		caps []string
	}{
		// Transit's writes to keys/<name> are updates, creation included.
		{s.mount + "/keys/" + name, []string{"read", "update"}},
		{s.mount + "/keys/" + name + "/rotate", []string{"update"}},
		{s.mount + "/sign/" + name, []string{"update"}},
	}
	paths := make([]string, len(need))
	for i, n := range need {
		paths[i] = n.path
	}
	var resp struct {
		Data map[string]json.RawMessage `json:"data"`
	}
	if err := s.write(ctx, "sys/capabilities-self", map[string]any{"paths": paths}, &resp); err != nil {
		return wrap("asking for the token's capabilities", err)
	}
	var missing []string
	for _, n := range need {
		var have []string
		if raw, ok := resp.Data[n.path]; ok {
			if err := json.Unmarshal(raw, &have); err != nil {
				return fmt.Errorf("keystore/vault: capabilities of %s: %w", n.path, err)
			}
		}
		if slices.Contains(have, "root") {
			continue
		}
		for _, c := range n.caps {
			if !slices.Contains(have, c) {
				missing = append(missing, c+" on "+n.path)
			}
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: the token's policies do not grant %s", ErrPermissionDenied, strings.Join(missing, ", "))
	}
	return nil
}

// checkMount asks which engine serves the mount path. Vault answers 403
// for a path under no mount, so that mounts cannot be discovered by
// probing; the capabilities are known to be there by now, so that means
// the mount is missing.
func (s *Store) checkMount(ctx context.Context) error {
	var resp struct {
		Data struct {
			Type string `json:"type"`
			Path string `json:"path"`
		} `json:"data"`
	}
	err := s.read(ctx, "sys/internal/ui/mounts/"+s.mount, &resp)
	var re *api.ResponseError
	if errors.As(err, &re) && (re.StatusCode == http.StatusForbidden || re.StatusCode == http.StatusNotFound) {
		return fmt.Errorf("%w: nothing is mounted at %s/ (%w)", ErrMountMissing, s.mount, &responseError{re})
	}
	if err != nil {
		return wrap("looking up the mount at "+s.mount, err)
	}
	if got := strings.Trim(resp.Data.Path, "/"); got != s.mount {
		return fmt.Errorf("%w: %s/ is inside the %s/ mount, not a mount itself", ErrMountMissing, s.mount, got)
	}
	if resp.Data.Type != "transit" {
		return fmt.Errorf("%w: %s/ is a %q secrets engine, not transit", ErrMountMissing, s.mount, resp.Data.Type)
	}
	return nil
}
