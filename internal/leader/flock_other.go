//go:build !unix

package leader

import (
	"errors"
	"os"
)

// tryLock fails where flock is unavailable: FileLock cannot elect there.
func tryLock(*os.File) error {
	return errors.New("file locks are not supported on this platform")
}
