//go:build unix

package leader

import (
	"os"

	"golang.org/x/sys/unix"
)

// tryLock takes an exclusive flock on file without waiting.
func tryLock(file *os.File) error {
	for {
		err := unix.Flock(int(file.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EWOULDBLOCK:
			return errLocked
		default:
			return err
		}
	}
}
