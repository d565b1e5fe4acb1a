package envoyconfig

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/internal/policy"
)

// Proxy is everything rendered for one proxy.
type Proxy struct {
	// Policy is the mesh-wide mTLS policy.
	Policy policy.Policy
	// Service is the workload the proxy fronts.
	Service Service
	// Destinations are the services the workload reaches through the proxy.
	Destinations []Destination
	// SDSSocket is the absolute path of the agent's SDS Unix socket.
	SDSSocket string
	// TrustDomain, when set, is the only one whose peers are accepted: their
	// certificates must carry a URI SAN starting spiffe://<TrustDomain>/.
	// Zero accepts any chain up to the trust bundle.
	TrustDomain spiffeid.TrustDomain
	// NodeID is the bootstrap's node.id; empty means Service.FQDN.
	NodeID string
}

// Service is the local workload.
type Service struct {
	// FQDN is the service's name, as the policy and its peers know it.
	FQDN string
	// Listen is where the inbound listener binds. Port 0 lets the system
	// choose, as Envoy does; only useful where the bound port can be read
	// back.
	Listen netip.AddrPort
	// App is where the local application listens.
	App netip.AddrPort
}

// Destination is a service the workload reaches through the proxy.
type Destination struct {
	// FQDN is the destination's name: the policy decides on it, and it is
	// sent as SNI.
	FQDN string
	// Listen is where the outbound listener binds, usually on loopback.
	// Port 0 lets the system choose.
	Listen netip.AddrPort
	// Address and Port are the destination's endpoint. An IP address gives a
	// STATIC cluster, a host name a STRICT_DNS one.
	Address string
	Port    uint16
}

// validate checks p and returns it with the policy normalized.
func (p Proxy) validate() (Proxy, error) {
	var errs []error
	pol, err := p.Policy.Normalize()
	if err != nil {
		errs = append(errs, err)
	}
	p.Policy = pol
	if p.Service.FQDN, err = policy.NormalizeFQDN(p.Service.FQDN); err != nil {
		errs = append(errs, fmt.Errorf("service: %w", err))
	}
	if !p.Service.Listen.IsValid() {
		errs = append(errs, errors.New("service: no listen address"))
	}
	if !p.Service.App.IsValid() || p.Service.App.Port() == 0 {
		errs = append(errs, errors.New("service: no application address and port"))
	}
	if p.SDSSocket == "" || !filepath.IsAbs(p.SDSSocket) {
		errs = append(errs, fmt.Errorf("SDS socket %q is not an absolute path", p.SDSSocket))
	}
	listens := map[netip.AddrPort]string{}
	if p.Service.Listen.Port() != 0 {
		listens[p.Service.Listen] = "the inbound listener"
	}
	dests := make([]Destination, len(p.Destinations))
	seen := map[string]bool{}
	for i, d := range p.Destinations {
		name, err := policy.NormalizeFQDN(d.FQDN)
		if err != nil {
			errs = append(errs, fmt.Errorf("destination %d: %w", i, err))
		}
		d.FQDN = name
		key := clusterName(d)
		switch {
		case seen[key]:
			errs = append(errs, fmt.Errorf("destination %s port %d is listed twice", d.FQDN, d.Port))
		case !d.Listen.IsValid():
			errs = append(errs, fmt.Errorf("destination %s: no listen address", d.FQDN))
		case d.Address == "" || d.Port == 0:
			errs = append(errs, fmt.Errorf("destination %s: no upstream address and port", d.FQDN))
		}
		seen[key] = true
		if d.Listen.Port() != 0 {
			if other, ok := listens[d.Listen]; ok {
				errs = append(errs, fmt.Errorf("destination %s listens on %s, as does %s", d.FQDN, d.Listen, other))
			}
			listens[d.Listen] = "destination " + d.FQDN
		}
		dests[i] = d
	}
	p.Destinations = dests
	if p.NodeID == "" {
		p.NodeID = p.Service.FQDN
	}
	if err := errors.Join(errs...); err != nil {
		return Proxy{}, fmt.Errorf("envoyconfig: %w", err)
	}
	return p, nil
}

// Validate reports every problem in p.
func (p Proxy) Validate() error {
	_, err := p.validate()
	return err
}

// ParseDestination reads a destination written as
// "fqdn=host:port[@listen]": the service's FQDN, its endpoint (an IP
// address or a DNS name; IPv6 in brackets) and, optionally, where the
// outbound listener binds. Without "@listen" it binds 127.0.0.1 on the
// endpoint's port, so the application reaches the service on loopback at
// the port it would have used.
func ParseDestination(s string) (Destination, error) {
	fail := func(format string, args ...any) (Destination, error) {
		return Destination{}, fmt.Errorf("envoyconfig: destination %q: %s", s, fmt.Sprintf(format, args...))
	}
	name, rest, ok := strings.Cut(s, "=")
	if !ok || name == "" {
		return fail("want fqdn=host:port[@listen]")
	}
	fqdn, err := policy.NormalizeFQDN(name)
	if err != nil {
		return fail("%v", err)
	}
	endpoint, listen, hasListen := strings.Cut(rest, "@")
	host, portStr, err := net.SplitHostPort(endpoint)
	if err != nil || host == "" {
		return fail("endpoint %q is not host:port", endpoint)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return fail("port %q is not a port number", portStr)
	}
	d := Destination{FQDN: fqdn, Address: host, Port: uint16(port),
		Listen: netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(port))}
	if hasListen {
		if d.Listen, err = netip.ParseAddrPort(listen); err != nil {
			return fail("listen address %q: want ip:port", listen)
		}
	}
	return d, nil
}
