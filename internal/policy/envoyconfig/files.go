package envoyconfig

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshca/meshca/internal/atomicfile"
)

// Type URLs of the resources in the LDS and CDS files.
const (
	ListenerType = "type.googleapis.com/envoy.config.listener.v3.Listener"
	ClusterType  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
)

// fileMode: the files hold no secrets, and Envoy may run as another user.
const fileMode = 0o644

// LDS returns the listeners as the DiscoveryResponse an LDS file holds.
func (r *Resources) LDS() (*discoveryv3.DiscoveryResponse, error) {
	return response(ListenerType, protos(r.Listeners))
}

// CDS returns the clusters as the DiscoveryResponse a CDS file holds.
func (r *Resources) CDS() (*discoveryv3.DiscoveryResponse, error) {
	return response(ClusterType, protos(r.Clusters))
}

func protos[M proto.Message](ms []M) []proto.Message {
	out := make([]proto.Message, len(ms))
	for i, m := range ms {
		out[i] = m
	}
	return out
}

// response packs msgs; its version is a hash of their content, so an
// unchanged configuration keeps its version.
func response(typeURL string, msgs []proto.Message) (*discoveryv3.DiscoveryResponse, error) {
	resp := &discoveryv3.DiscoveryResponse{TypeUrl: typeURL}
	h := sha256.New()
	for _, m := range msgs {
		a, err := typed(m)
		if err != nil {
			return nil, err
		}
		if a.GetTypeUrl() != typeURL {
			return nil, fmt.Errorf("envoyconfig: resource of type %s in a response of %s", a.GetTypeUrl(), typeURL)
		}
		h.Write(a.GetValue())
		resp.Resources = append(resp.Resources, a)
	}
	resp.VersionInfo = hex.EncodeToString(h.Sum(nil)[:8])
	if err := Validate(resp); err != nil {
		return nil, err
	}
	return resp, nil
}

// Marshal returns m as indented JSON with proto field names, the same bytes
// for the same message on every run (protojson alone varies its spacing).
func Marshal(m proto.Message) ([]byte, error) {
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("envoyconfig: %w", err)
	}
	var out bytes.Buffer
	if err := json.Indent(&out, b, "", "  "); err != nil {
		return nil, fmt.Errorf("envoyconfig: %w", err)
	}
	out.WriteByte('\n')
	return out.Bytes(), nil
}

// Files returns the contents of the LDS and CDS files.
func (r *Resources) Files() (lds, cds []byte, err error) {
	ldsResp, err := r.LDS()
	if err != nil {
		return nil, nil, err
	}
	cdsResp, err := r.CDS()
	if err != nil {
		return nil, nil, err
	}
	if lds, err = Marshal(ldsResp); err != nil {
		return nil, nil, err
	}
	if cds, err = Marshal(cdsResp); err != nil {
		return nil, nil, err
	}
	return lds, cds, nil
}

// Write replaces the CDS and then the LDS file in dir, the directory the
// bootstrap watches. Each is written to a temporary file in dir and renamed
// over the old one: the move is what Envoy reacts to, and it never sees a
// partial file. Clusters go first so that new listeners find theirs.
func Write(dir string, r *Resources) error {
	lds, cds, err := r.Files()
	if err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(dir, CDSFile), cds, fileMode); err != nil {
		return fmt.Errorf("envoyconfig: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, LDSFile), lds, fileMode); err != nil {
		return fmt.Errorf("envoyconfig: %w", err)
	}
	return nil
}

// Read parses and validates the LDS and CDS files in dir, as Write left
// them.
func Read(dir string) (*Resources, error) {
	lds, err := os.ReadFile(filepath.Join(dir, LDSFile))
	if err != nil {
		return nil, fmt.Errorf("envoyconfig: %w", err)
	}
	cds, err := os.ReadFile(filepath.Join(dir, CDSFile))
	if err != nil {
		return nil, fmt.Errorf("envoyconfig: %w", err)
	}
	return Parse(lds, cds)
}

// WriteBootstrap writes b to path, atomically.
func WriteBootstrap(path string, b *bootstrapv3.Bootstrap) error {
	data, err := Marshal(b)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(path, data, fileMode); err != nil {
		return fmt.Errorf("envoyconfig: %w", err)
	}
	return nil
}

// ParseResponse decodes the JSON of an LDS or CDS file holding resources
// of typeURL, validates it and returns its resources.
func ParseResponse(data []byte, typeURL string) (*discoveryv3.DiscoveryResponse, []proto.Message, error) {
	resp := &discoveryv3.DiscoveryResponse{}
	if err := protojson.Unmarshal(data, resp); err != nil {
		return nil, nil, fmt.Errorf("envoyconfig: %w", err)
	}
	if resp.GetTypeUrl() != typeURL {
		return nil, nil, fmt.Errorf("envoyconfig: response of type %q, want %s", resp.GetTypeUrl(), typeURL)
	}
	if err := Validate(resp); err != nil {
		return nil, nil, err
	}
	var msgs []proto.Message
	for i, a := range resp.GetResources() {
		if a.GetTypeUrl() != typeURL {
			return nil, nil, fmt.Errorf("envoyconfig: resource %d of type %q, want %s", i, a.GetTypeUrl(), typeURL)
		}
		m, err := anypb.UnmarshalNew(a, proto.UnmarshalOptions{})
		if err != nil {
			return nil, nil, fmt.Errorf("envoyconfig: resource %d: %w", i, err)
		}
		msgs = append(msgs, m)
	}
	return resp, msgs, nil
}

// Parse decodes the contents of an LDS and a CDS file.
func Parse(lds, cds []byte) (*Resources, error) {
	_, ls, err := ParseResponse(lds, ListenerType)
	if err != nil {
		return nil, err
	}
	_, cs, err := ParseResponse(cds, ClusterType)
	if err != nil {
		return nil, err
	}
	r := &Resources{}
	for _, m := range ls {
		l, ok := m.(*listenerv3.Listener)
		if !ok {
			return nil, errors.New("envoyconfig: LDS resource is not a listener")
		}
		r.Listeners = append(r.Listeners, l)
	}
	for _, m := range cs {
		c, ok := m.(*clusterv3.Cluster)
		if !ok {
			return nil, errors.New("envoyconfig: CDS resource is not a cluster")
		}
		r.Clusters = append(r.Clusters, c)
	}
	return r, nil
}
