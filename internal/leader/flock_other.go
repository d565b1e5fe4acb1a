//go:build !unix

package leader

import (
	"errors"
	"os"
)

var errLocked = errors.New("leader: locked by another holder")

// tryLock fails where flock is unavailable: FileLock cannot elect there.
func tryLock(*os.File) error {
	return errors.New("file locks are not supported on this platform")
}
