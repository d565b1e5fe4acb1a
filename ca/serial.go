package ca

import (
	"crypto/rand"
	"fmt"
	"io"
	"math/big"
)

// serialLimit bounds serials to 128 bits: unpredictable (RFC 5280 §4.1.2.2
// and the CA/B Forum both want ≥ 64 bits of entropy) yet within the 20-octet
// limit once DER adds its sign byte.
var serialLimit = new(big.Int).Lsh(big.NewInt(1), 128)

// NewSerial returns a random, positive, non-zero 128-bit serial number.
func NewSerial(r io.Reader) (*big.Int, error) {
	for {
		n, err := rand.Int(r, serialLimit)
		if err != nil {
			return nil, fmt.Errorf("ca: serial: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}
