// Package deploy holds meshca's Kubernetes manifests, a kustomize base with
// overlays, and renders them as `kubectl kustomize` does, for the tests that
// check them against golden files and a real API server.
package deploy

import (
	"embed"
	"fmt"
	"io/fs"
	"path"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// Kustomizations are the directories a user applies with `kubectl apply -k`.
var Kustomizations = []string{"base", "overlays/vault", "examples/sidecar"}

//go:embed base overlays examples extras
var manifests embed.FS

// Render builds the kustomization in dir (one of Kustomizations) and
// returns its objects as one multi-document YAML stream.
func Render(dir string) ([]byte, error) {
	mem := filesys.MakeFsInMemory()
	err := fs.WalkDir(manifests, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := manifests.ReadFile(p)
		if err != nil {
			return err
		}
		return mem.WriteFile(path.Join("/", p), b)
	})
	if err != nil {
		return nil, fmt.Errorf("deploy: %w", err)
	}
	// The defaults of kubectl's built-in kustomize: no plugins, no
	// network, no files outside the tree.
	res, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(mem, path.Join("/", dir))
	if err != nil {
		return nil, fmt.Errorf("deploy: kustomize %s: %w", dir, err)
	}
	out, err := res.AsYaml()
	if err != nil {
		return nil, fmt.Errorf("deploy: %s: %w", dir, err)
	}
	return out, nil
}

// Extra returns a manifest of extras/, applied on its own when wanted.
func Extra(name string) ([]byte, error) {
	b, err := manifests.ReadFile(path.Join("extras", name))
	if err != nil {
		return nil, fmt.Errorf("deploy: %w", err)
	}
	return b, nil
}
