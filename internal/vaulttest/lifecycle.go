package vaulttest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"
)

// Seal seals Vault. A persistent Vault opens again with Unseal; a
// development one stays sealed.
func (v *Vault) Seal(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	if err := v.client.Sys().SealWithContext(ctx); err != nil {
		t.Fatalf("vaulttest: sealing: %v", err)
	}
}

// Unseal unseals a persistent Vault with its key and waits until it is
// active again.
func (v *Vault) Unseal(t testing.TB) {
	t.Helper()
	if !v.persistent {
		t.Fatalf("vaulttest: Unseal: a development Vault's unseal key is not kept; start it with Options{Persistent: true}")
	}
	if err := v.unseal(); err != nil {
		t.Fatalf("vaulttest: %v", err)
	}
}

// Stop stops Vault (SIGTERM, then SIGKILL after a grace period) and waits
// until its address refuses connections, to test how clients behave during
// an outage. A persistent Vault comes back with Restart; a development one
// loses everything.
func (v *Vault) Stop(t testing.TB) {
	t.Helper()
	if v.proc == nil || v.proc.Exited() {
		t.Fatalf("vaulttest: Stop: vault is not running")
	}
	v.proc.Stop(stopGrace)
	if err := waitRefused(v.hostport(), readyTimeout); err != nil {
		t.Fatalf("vaulttest: Stop: %v", err)
	}
}

// Restart starts a persistent Vault again after Stop, on the same address
// with the same certificate, unseals it and waits until it is active. Its
// data, root token and the tokens it issued are as they were.
func (v *Vault) Restart(t testing.TB) {
	t.Helper()
	if !v.persistent {
		t.Fatalf("vaulttest: Restart: a development Vault keeps its data in memory; start it with Options{Persistent: true}")
	}
	if v.proc != nil && !v.proc.Exited() {
		t.Fatalf("vaulttest: Restart: vault is still running; Stop it first")
	}
	begin := time.Now()
	if err := v.restart(); err != nil {
		t.Fatalf("vaulttest: restarting: %v", err) // the cleanup prints the log
	}
	t.Logf("vaulttest: vault restarted at %s in %v", v.Addr(), time.Since(begin).Round(time.Millisecond))
}

func (v *Vault) unseal() error {
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	st, err := v.client.Sys().UnsealWithContext(ctx, v.unsealKey)
	if err != nil {
		return fmt.Errorf("unsealing: %w", err)
	}
	if st.Sealed {
		return errors.New("unsealing: still sealed after the unseal key")
	}
	// Unsealed is not yet active: requests may still be refused until
	// sys/health says so.
	if err := v.proc.WaitReady(readyTimeout, getCheck(v.caFile, v.Addr()+"/v1/sys/health")); err != nil {
		return fmt.Errorf("unsealing: %w", err)
	}
	return nil
}

// waitRefused polls until connecting to hostport is refused: the process is
// gone and nothing else listens there.
func waitRefused(hostport string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", hostport, time.Second)
		if err == nil {
			c.Close()
		} else if errors.Is(err, syscall.ECONNREFUSED) {
			return nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				return fmt.Errorf("%s still accepts connections after %v", hostport, timeout)
			}
			return fmt.Errorf("%s: connections not refused after %v: %w", hostport, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
