package memory_test

import (
	"testing"

	"github.com/meshca/meshca/keystore"
	"github.com/meshca/meshca/keystore/keystoretest"
	"github.com/meshca/meshca/keystore/memory"
)

func TestConformance(t *testing.T) {
	keystoretest.Run(t, func(*testing.T) keystore.Store { return memory.New() })
}
