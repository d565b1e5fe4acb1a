//go:build !unix

package policy

// lockFile is a no-op where flock is unavailable: writers in one process
// still serialize on FileStore's mutex, but writers in different
// processes may lose each other's updates.
func lockFile(string) (unlock func(), err error) {
	return func() {}, nil
}
