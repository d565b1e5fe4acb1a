package testenv

import "syscall"

// sysProcAttr makes the kernel kill the child when the test binary dies, so
// a test that times out or panics does not leave apiservers and etcds behind.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
