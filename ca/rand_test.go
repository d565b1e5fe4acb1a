package ca_test

import "crypto/rand"

// randReader is crypto/rand as an io.Reader value, for APIs that take one.
type randReader struct{}

func (randReader) Read(p []byte) (int, error) { return rand.Read(p) }
