package agent_test

import (
	"crypto/tls"
	"io"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/sds"
	"github.com/meshca/meshca/sds/sdstest"
)

// handshake runs an mTLS handshake over loopback TCP between a server and a
// client built from SDS secrets, and returns the identity each end saw and
// each end's error.
func handshake(t *testing.T, server, client *tls.Config) (clientSeen, serverSeen string, serverErr, clientErr error) {
	t.Helper()
	lis, err := tls.Listen("tcp", "127.0.0.1:0", server)
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	type result struct {
		peer string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		tc := c.(*tls.Conn)
		if err := tc.Handshake(); err != nil {
			done <- result{err: err}
			return
		}
		peer := peerID(tc)
		_, err = io.WriteString(c, "hello "+peer)
		done <- result{peer: peer, err: err}
	}()
	conn, clientErr := tls.Dial("tcp", lis.Addr().String(), client)
	if clientErr == nil {
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		serverSeen = peerID(conn)
		var msg []byte
		if msg, clientErr = io.ReadAll(conn); clientErr == nil && string(msg) == "" {
			clientErr = io.ErrUnexpectedEOF
		}
	}
	r := <-done
	return r.peer, serverSeen, r.err, clientErr
}

func peerID(c *tls.Conn) string {
	certs := c.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return ""
	}
	id, err := x509svid.IDFromCert(certs[0])
	if err != nil {
		return ""
	}
	return id.String()
}

func tlsConfig(t *testing.T, c *sdstest.Client) *tls.Config {
	t.Helper()
	cfg, err := c.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestWorkloadsOfTwoAgentsHandshake(t *testing.T) {
	ctx := testCtx(t)
	m := newMesh(t)
	web := m.startReady(t, ctx, m.config(t, "default", "web"))
	db := m.startReady(t, ctx, m.config(t, "prod", "db"))
	hasBoth := func(s sdstest.State) bool { return s.Has(sds.CertName, sds.RootsName) }
	webProxy, dbProxy := envoy(t, ctx, web, "web", false), envoy(t, ctx, db, "db", true)
	wait(t, ctx, webProxy, hasBoth)
	wait(t, ctx, dbProxy, hasBoth)

	// db serves, web connects.
	clientSeen, serverSeen, serr, cerr := handshake(t, tlsConfig(t, dbProxy), tlsConfig(t, webProxy))
	if serr != nil || cerr != nil {
		t.Fatalf("mTLS between two agents' workloads failed: server %v, client %v", serr, cerr)
	}
	if clientSeen != webID.String() || serverSeen != dbID.String() {
		t.Fatalf("server saw %q and client saw %q, want %s and %s", clientSeen, serverSeen, webID, dbID)
	}

	// A workload of another mesh, another root, is refused.
	other := newMesh(t)
	stranger := other.startReady(t, ctx, other.config(t, "default", "web"))
	strangerProxy := envoy(t, ctx, stranger, "stranger", false)
	wait(t, ctx, strangerProxy, hasBoth)
	if _, _, serr, _ := handshake(t, tlsConfig(t, dbProxy), tlsConfig(t, strangerProxy)); serr == nil {
		t.Fatal("a workload of another mesh was accepted")
	}
}
