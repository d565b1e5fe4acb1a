package vaulttest

import "syscall"

// sysProcAttr makes the kernel kill Vault when the test binary dies, so a
// test that times out or panics does not leave servers behind.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
