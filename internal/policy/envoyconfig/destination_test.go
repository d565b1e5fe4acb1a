package envoyconfig_test

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/meshca/meshca/internal/policy/envoyconfig"
)

func TestParseDestination(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want envoyconfig.Destination
	}{
		{"db.shop.svc.cluster.local=10.0.0.5:5432", envoyconfig.Destination{FQDN: "db.shop.svc.cluster.local",
			Address: "10.0.0.5", Port: 5432, Listen: netip.MustParseAddrPort("127.0.0.1:5432")}},
		{"DB.Shop.svc.cluster.local.=db.shop.svc:5432@127.0.0.2:15432", envoyconfig.Destination{FQDN: "db.shop.svc.cluster.local",
			Address: "db.shop.svc", Port: 5432, Listen: netip.MustParseAddrPort("127.0.0.2:15432")}},
		{"api.example.com=[fd00::1]:443@[::1]:8443", envoyconfig.Destination{FQDN: "api.example.com",
			Address: "fd00::1", Port: 443, Listen: netip.MustParseAddrPort("[::1]:8443")}},
	} {
		got, err := envoyconfig.ParseDestination(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseDestination(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{
		"",
		"db.shop.svc.cluster.local",
		"=10.0.0.5:5432",
		"db.shop.svc.cluster.local=10.0.0.5",
		"db.shop.svc.cluster.local=:5432",
		"db.shop.svc.cluster.local=10.0.0.5:0",
		"db.shop.svc.cluster.local=10.0.0.5:70000",
		"db.shop.svc.cluster.local=10.0.0.5:5432@localhost:15432",
		"db_shop!=10.0.0.5:5432",
	} {
		if _, err := envoyconfig.ParseDestination(in); err == nil || !strings.HasPrefix(err.Error(), "envoyconfig: destination") {
			t.Errorf("ParseDestination(%q) = %v, want an error naming it", in, err)
		}
	}
}
