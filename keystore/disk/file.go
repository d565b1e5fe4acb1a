package disk

import (
	"path/filepath"
	"strings"

	"github.com/meshca/meshca/internal/atomicfile"
)

// isTemp recognises files of writes in flight (atomicfile.TempPrefix). Their
// names start with a dot, which no key id or metadata file can, so they
// never shadow a real file.
func isTemp(name string) bool {
	return strings.HasPrefix(name, atomicfile.TempPrefix)
}

// writeFileAtomic replaces dir/name with data such that a crash at any point
// leaves either the old content or the new, never a mix.
func writeFileAtomic(dir, name string, data []byte) error {
	return atomicfile.Write(filepath.Join(dir, name), data, 0o600)
}
