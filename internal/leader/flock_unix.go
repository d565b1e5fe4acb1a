//go:build unix

package leader

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

var errLocked = errors.New("leader: locked by another holder")

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
