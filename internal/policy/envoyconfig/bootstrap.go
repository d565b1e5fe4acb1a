package envoyconfig

import (
	"fmt"
	"path/filepath"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// Names of the files Write produces in its directory, and the name node
// agents give the bootstrap there. Envoy infers the format from the
// extension.
const (
	LDSFile       = "lds.json"
	CDSFile       = "cds.json"
	BootstrapFile = "bootstrap.json"
)

// Bootstrap returns the bootstrap of p, whose LDS and CDS files are in dir
// (absolute): the node, the SDS cluster as the only static resource, and
// LDS and CDS read from dir and reloaded when a file is moved into it.
func Bootstrap(p Proxy, dir string) (*bootstrapv3.Bootstrap, error) {
	p, err := p.validate()
	if err != nil {
		return nil, err
	}
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("envoyconfig: configuration directory %q is not an absolute path", dir)
	}
	sdsCluster, err := SDSClusterFor(p.SDSSocket)
	if err != nil {
		return nil, err
	}
	b := &bootstrapv3.Bootstrap{
		// Envoy wants both for file-based subscriptions.
		Node: &corev3.Node{Id: p.NodeID, Cluster: p.Service.FQDN},
		StaticResources: &bootstrapv3.Bootstrap_StaticResources{
			Clusters: []*clusterv3.Cluster{sdsCluster},
		},
		DynamicResources: &bootstrapv3.Bootstrap_DynamicResources{
			LdsConfig: fileSource(filepath.Join(dir, LDSFile), dir),
			CdsConfig: fileSource(filepath.Join(dir, CDSFile), dir),
		},
	}
	if err := Validate(b); err != nil {
		return nil, err
	}
	return b, nil
}

func fileSource(path, dir string) *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ResourceApiVersion: corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_PathConfigSource{PathConfigSource: &corev3.PathConfigSource{
			Path:             path,
			WatchedDirectory: &corev3.WatchedDirectory{Path: dir},
		}},
	}
}

// SDSClusterFor returns the static cluster that reaches the agent's SDS
// server on the Unix socket at path. gRPC needs HTTP/2, which a cluster
// speaks only when told to.
func SDSClusterFor(path string) (*clusterv3.Cluster, error) {
	opts, err := typed(&httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{
					Http2ProtocolOptions: &corev3.Http2ProtocolOptions{},
				},
			},
		},
	})
	if err != nil {
		return nil, err
	}
	return &clusterv3.Cluster{
		Name:                 SDSCluster,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		LoadAssignment: loadAssignment(SDSCluster, &corev3.Address{Address: &corev3.Address_Pipe{
			Pipe: &corev3.Pipe{Path: path},
		}}),
		TypedExtensionProtocolOptions: map[string]*anypb.Any{httpOptionsName: opts},
	}, nil
}
