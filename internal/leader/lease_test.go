package leader_test

import (
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/internal/leader"
	"github.com/meshca/meshca/internal/testenv"
)

const leaseNS = "meshca-system"

// Short enough for a test, long enough that a loaded machine renews in
// time: a leader that cannot renew gives up after about 3.3s, before
// the others take over at 5s.
const (
	leaseDuration = 5 * time.Second
	renewDeadline = 3 * time.Second
	retryPeriod   = 300 * time.Millisecond
)

type leaseCandidate struct {
	*leader.Lease
	id   string
	reg  *prometheus.Registry
	stop func()
}

func startLease(t *testing.T, client kubernetes.Interface, name, id string) *leaseCandidate {
	t.Helper()
	reg := prometheus.NewRegistry()
	l, err := leader.NewLease(leader.LeaseConfig{
		Client: client, Namespace: leaseNS, Name: name, Identity: id,
		LeaseDuration: leaseDuration, RenewDeadline: renewDeadline, RetryPeriod: retryPeriod,
		Metrics: reg,
	})
	if err != nil {
		t.Fatal(err)
	}
	c := &leaseCandidate{Lease: l, id: id, reg: reg}
	c.stop = run(t, l)
	return c
}

// waitLeads polls until want leads and every other candidate sees it as
// leader, failing at once if two ever lead together.
func waitLeads(t *testing.T, want *leaseCandidate, all ...*leaseCandidate) {
	t.Helper()
	testenv.Eventually(t, want.id+" leads", func() error {
		var leading []string
		for _, c := range all {
			if c.IsLeader() {
				leading = append(leading, c.id)
			}
		}
		if len(leading) > 1 {
			t.Fatalf("two leaders at once: %v", leading)
		}
		if !want.IsLeader() {
			return fmt.Errorf("leaders %v", leading)
		}
		for _, c := range all {
			if got := c.Leader(); got != want.id {
				return fmt.Errorf("%s sees %q as leader", c.id, got)
			}
		}
		return nil
	})
}

func holder(t *testing.T, client kubernetes.Interface, name string) string {
	t.Helper()
	lease, err := client.CoordinationV1().Leases(leaseNS).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if lease.Spec.HolderIdentity == nil {
		return ""
	}
	return *lease.Spec.HolderIdentity
}

func TestLeaseAgainstAPIServer(t *testing.T) {
	env := testenv.StartKube(t)
	client := env.Clientset()
	env.CreateNamespace(t, leaseNS)

	t.Run("OneLeadsAndCancelHandsOver", func(t *testing.T) {
		a := startLease(t, client, "handover", "a")
		b := startLease(t, client, "handover", "b")
		var first, second *leaseCandidate
		testenv.Eventually(t, "one of two leads", func() error {
			switch al, bl := a.IsLeader(), b.IsLeader(); {
			case al && bl:
				t.Fatal("both lead")
			case al:
				first, second = a, b
			case bl:
				first, second = b, a
			default:
				return fmt.Errorf("neither leads")
			}
			return nil
		})
		waitLeads(t, first, a, b)
		if got := holder(t, client, "handover"); got != first.id {
			t.Errorf("Lease held by %q, want %q", got, first.id)
		}

		changed := second.Changed()
		first.stop()
		if first.IsLeader() {
			t.Error("leads after Run returned")
		}
		// Released on the way out, so the other need not wait for the
		// lease to lapse.
		if got := holder(t, client, "handover"); got == first.id {
			t.Errorf("Lease still held by %q after its Run returned", got)
		}
		waitLeads(t, second, second)
		assertClosed(t, second.id, changed)
		assertMetrics(t, first.id, first.reg, 0, 2)
		assertMetrics(t, second.id, second.reg, 1, 1)
	})

	t.Run("LeaderThatCannotRenewStepsDownAndStandsAgain", func(t *testing.T) {
		p := startProxy(t, env.Host())
		cut := env.Config()
		cut.Host = "https://" + p.addr()
		cutClient, err := kubernetes.NewForConfig(cut)
		if err != nil {
			t.Fatal(err)
		}
		a := startLease(t, cutClient, "outage", "a")
		waitLeads(t, a, a)
		b := startLease(t, client, "outage", "b")
		waitLeads(t, a, a, b)

		p.block()
		testenv.Eventually(t, "a steps down", func() error {
			if a.IsLeader() && b.IsLeader() {
				t.Fatal("both lead")
			}
			if a.IsLeader() {
				return fmt.Errorf("still leads")
			}
			return nil
		})
		// a cannot read the Lease, so only b's view is checked.
		testenv.Eventually(t, "b leads", func() error {
			if a.IsLeader() {
				t.Fatal("a leads again without reaching the API server")
			}
			if !b.IsLeader() || b.Leader() != "b" {
				return fmt.Errorf("b leads %v, sees %q", b.IsLeader(), b.Leader())
			}
			return nil
		})

		p.unblock()
		waitLeads(t, b, a, b)
		b.stop()
		waitLeads(t, a, a)
		assertMetrics(t, "a", a.reg, 1, 3)
	})
}

func TestNewLeaseRejectsBadConfig(t *testing.T) {
	client, err := kubernetes.NewForConfig(&rest.Config{Host: "https://127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	for name, cfg := range map[string]leader.LeaseConfig{
		"no client":                  {Namespace: "ns", Name: "n"},
		"no name":                    {Client: client, Namespace: "ns"},
		"no namespace":               {Client: client, Name: "n"},
		"renew deadline over lease":  {Client: client, Namespace: "ns", Name: "n", LeaseDuration: 5 * time.Second, RenewDeadline: 6 * time.Second},
		"retry period over deadline": {Client: client, Namespace: "ns", Name: "n", RenewDeadline: 2 * time.Second, RetryPeriod: 2 * time.Second},
		"lease under one second":     {Client: client, Namespace: "ns", Name: "n", LeaseDuration: 900 * time.Millisecond, RenewDeadline: 500 * time.Millisecond, RetryPeriod: 100 * time.Millisecond},
		// Stored as 7s, no longer than the 5s deadline and 2s retry
		// need: the others could take over while this replica leads.
		"lease in fractions of a second": {Client: client, Namespace: "ns", Name: "n", LeaseDuration: 7500 * time.Millisecond, RenewDeadline: 5 * time.Second, RetryPeriod: 2 * time.Second},
		// A cut-off leader leads until 3.5s after its last renewal;
		// others that saw it up to a second early take over after 3s.
		"lease within deadline, retry and a second": {Client: client, Namespace: "ns", Name: "n", LeaseDuration: 4 * time.Second, RenewDeadline: 3 * time.Second, RetryPeriod: 500 * time.Millisecond},
		"lease within deadline and retry":           {Client: client, Namespace: "ns", Name: "n", LeaseDuration: 12 * time.Second, RenewDeadline: 10 * time.Second, RetryPeriod: 2 * time.Second},
		"negative retry period":                     {Client: client, Namespace: "ns", Name: "n", RetryPeriod: -time.Second},
	} {
		if _, err := leader.NewLease(cfg); err == nil || !strings.HasPrefix(err.Error(), "leader: ") {
			t.Errorf("%s: NewLease = %v, want a leader: error", name, err)
		}
	}
	if _, err := leader.NewLease(leader.LeaseConfig{Client: client, Namespace: "ns", Name: "n"}); err != nil {
		t.Errorf("defaults: %v", err)
	}
	if _, err := leader.NewLease(leader.LeaseConfig{Client: client, Namespace: "ns", Name: "n",
		LeaseDuration: 5 * time.Second, RenewDeadline: 3 * time.Second, RetryPeriod: 500 * time.Millisecond}); err != nil {
		t.Errorf("lease 5s, renew deadline 3s, retry 500ms: %v", err)
	}
}

// TestCheckTimings: each timing the election cannot keep is refused with
// the rule it breaks; sound combinations pass.
func TestCheckTimings(t *testing.T) {
	const s, ms = time.Second, time.Millisecond
	for _, tc := range []struct {
		lease, renew, retry time.Duration
		want                string // "" for accepted
	}{
		{leader.DefaultLeaseDuration, leader.DefaultRenewDeadline, leader.DefaultRetryPeriod, ""},
		{5 * s, 3 * s, 500 * ms, ""},
		{4 * s, 3 * s, 500 * ms, "leader: lease duration 4s must be longer than 4.5s, renew deadline 3s plus retry period 500ms and 1s"},
		{12 * s, 10 * s, 2 * s, "leader: lease duration 12s must be longer than 12s, renew deadline 10s plus retry period 2s:"},
		{3 * s, 3 * s, 2 * s, "leader: lease duration 3s must be longer than 5s"},
		{15 * s, 2 * s, 2 * s, "leader: renew deadline 2s must be longer than 1.2 × retry period 2s"},
		{4500 * ms, 3 * s, 500 * ms, "leader: lease duration 4.5s is not a whole number of seconds"},
		{500 * ms, 200 * ms, 100 * ms, "leader: lease duration 500ms is under the Lease's resolution of 1s"},
		{15 * s, 10 * s, 0, "must all be positive"},
		{15 * s, -s, 2 * s, "must all be positive"},
	} {
		err := leader.CheckTimings(tc.lease, tc.renew, tc.retry)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%v/%v/%v: %v", tc.lease, tc.renew, tc.retry, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%v/%v/%v: %v, want %q", tc.lease, tc.renew, tc.retry, err, tc.want)
		}
	}
}

// proxy forwards TCP connections to the API server until blocked, when it
// cuts them and refuses new ones: an outage seen by one client only.
type proxy struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup

	mu      sync.Mutex
	blocked bool
	conns   map[net.Conn]struct{}
}

func startProxy(t *testing.T, apiURL string) *proxy {
	t.Helper()
	u, err := url.Parse(apiURL)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: u.Host, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(func() {
		ln.Close()
		p.block()
		p.wg.Wait()
	})
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go p.forward(c)
	}
}

func (p *proxy) forward(down net.Conn) {
	defer p.wg.Done()
	up, err := net.Dial("tcp", p.target)
	if err != nil {
		down.Close()
		return
	}
	if !p.track(down, up) {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		_, _ = io.Copy(up, down)
		up.Close()
		down.Close()
	}()
	_, _ = io.Copy(down, up)
	up.Close()
	down.Close()
}

// track registers live connections, or closes them if blocked.
func (p *proxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cs {
		if p.blocked {
			c.Close()
		} else {
			p.conns[c] = struct{}{}
		}
	}
	return !p.blocked
}

func (p *proxy) block() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blocked = true
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

func (p *proxy) unblock() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blocked = false
}
