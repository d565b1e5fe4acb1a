package testenv

import (
	"testing"
	"time"
)

// Eventually polls f every 20 ms until it returns nil, failing the test with
// f's last error after a minute. For what a watch or a background loop
// brings about a moment after the call that caused it.
func Eventually(t testing.TB, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still %v after a minute", what, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
