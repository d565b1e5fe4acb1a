//go:build !linux

package vaulttest

import "syscall"

// sysProcAttr: only Linux can tie a child's life to its parent; elsewhere the
// t.Cleanup stop is all there is.
func sysProcAttr() *syscall.SysProcAttr { return nil }
