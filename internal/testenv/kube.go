package testenv

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/meshca/meshca/internal/testenv/fixture"
)

// Issuer is the service-account token issuer, the one a real cluster uses, so
// the tokens look like production ones.
const Issuer = "https://kubernetes.default.svc.cluster.local"

const (
	// readyTimeout bounds start-up. The apiserver is ready in 2–3 s on an
	// idle machine; the margin is for `go test ./...` running packages, and
	// the race detector, in parallel on 2 cores.
	readyTimeout = 2 * time.Minute
	stopGrace    = 10 * time.Second
	logTailLines = 60
)

// Kube is a running etcd and kube-apiserver owned by one test.
type Kube struct {
	bin, dir            string
	etcdPort, etcdPeer  int
	apiPort             int
	token               string
	caFile, kubeconfig  string
	config              *rest.Config
	clientset           *kubernetes.Clientset
	etcd, apiserver     *fixture.Process
	readyz              *http.Client
	apiserverStartedFor time.Duration
}

// StartKube starts etcd and kube-apiserver on free loopback ports, waits until
// the apiserver is ready and stops both when the test ends. It fails the test
// if the binaries are missing or either process does not come up, printing
// the end of their logs.
func StartKube(t testing.TB) *Kube {
	t.Helper()
	bin, err := binDir()
	if err != nil {
		t.Fatalf("testenv: no kube-apiserver/etcd binaries: %v\nbuild them with: hack/testenv.sh (or make testenv)", err)
	}
	k := &Kube{bin: bin, dir: t.TempDir()}
	t.Cleanup(func() {
		k.stopAll()
		if t.Failed() {
			k.logTails(t)
		}
	})
	if err := k.setup(); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	if err := k.startEtcd(); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	if err := k.startAPIServer(true); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	if err := k.makeClients(); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Logf("testenv: kube-apiserver ready at %s in %v", k.config.Host, k.apiserverStartedFor.Round(time.Millisecond))
	return k
}

// setup writes the files the apiserver reads: the service-account signing
// key and the static token of the admin user.
func (k *Kube) setup() error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("service-account key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	if err := os.WriteFile(k.path("sa.key"), keyPEM, 0o600); err != nil {
		return fmt.Errorf("service-account key: %w", err)
	}
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return fmt.Errorf("admin token: %w", err)
	}
	k.token = hex.EncodeToString(b)
	// system:masters bypasses RBAC, so the admin needs no bindings.
	line := k.token + `,testenv-admin,testenv-admin,"system:masters"` + "\n"
	if err := os.WriteFile(k.path("tokens.csv"), []byte(line), 0o600); err != nil {
		return fmt.Errorf("admin token: %w", err)
	}
	k.caFile = filepath.Join(k.path("certs"), "apiserver.crt")
	return nil
}

func (k *Kube) path(name string) string { return filepath.Join(k.dir, name) }

func (k *Kube) startEtcd() error {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if k.etcdPort, err = fixture.FreePort(); err != nil {
			return err
		}
		if k.etcdPeer, err = fixture.FreePort(); err != nil {
			return err
		}
		client := "http://127.0.0.1:" + strconv.Itoa(k.etcdPort)
		peer := "http://127.0.0.1:" + strconv.Itoa(k.etcdPeer)
		k.etcd, err = fixture.Start("etcd", k.path("etcd.log"), nil, filepath.Join(k.bin, "etcd"),
			"--name=testenv",
			"--data-dir="+k.path("etcd-data"),
			"--listen-client-urls="+client,
			"--advertise-client-urls="+client,
			"--listen-peer-urls="+peer,
			"--initial-advertise-peer-urls="+peer,
			"--initial-cluster=testenv="+peer,
			// A test cluster needs neither durability nor tolerance of slow
			// disks: without fsync and with short raft timers etcd is
			// healthy in about 0.1 s.
			"--unsafe-no-fsync",
			"--heartbeat-interval=10",
			"--election-timeout=100",
			"--log-level=warn",
		)
		if err != nil {
			return err
		}
		hc := &http.Client{Timeout: 2 * time.Second}
		err = k.etcd.WaitReady(readyTimeout, func(ctx context.Context) error { return fixture.GetOK(ctx, hc, client+"/health") })
		if err == nil || !k.etcd.Exited() || !k.etcd.PortInUse() {
			return err
		}
	}
	return err
}

func (k *Kube) apiserverArgs() []string {
	return []string{
		"--etcd-servers=http://127.0.0.1:" + strconv.Itoa(k.etcdPort),
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(k.apiPort),
		// The apiserver writes a self-signed serving certificate (and its CA)
		// here on first start and reuses it on restart, so the CA file stays
		// valid across Stop/Start.
		"--cert-dir=" + k.path("certs"),
		"--token-auth-file=" + k.path("tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=" + Issuer,
		"--service-account-key-file=" + k.path("sa.key"),
		"--service-account-signing-key-file=" + k.path("sa.key"),
		"--service-cluster-ip-range=10.96.0.0/24",
		// No controller-manager runs, so nothing would reconcile the
		// kubernetes Service endpoints.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
	}
}

// startAPIServer starts the apiserver and waits for /readyz. A first start
// picks a port (retrying if another process took it); a restart reuses it, so
// clients made before Stop keep working after Start.
func (k *Kube) startAPIServer(first bool) error {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if first {
			if k.apiPort, err = fixture.FreePort(); err != nil {
				return err
			}
		}
		begin := time.Now()
		k.apiserver, err = fixture.Start("kube-apiserver", k.path("kube-apiserver.log"), nil, filepath.Join(k.bin, "kube-apiserver"), k.apiserverArgs()...)
		if err != nil {
			return err
		}
		err = k.apiserver.WaitReady(readyTimeout, k.checkReadyz)
		k.apiserverStartedFor = time.Since(begin)
		if err == nil || !first || !k.apiserver.Exited() || !k.apiserver.PortInUse() {
			return err
		}
	}
	return err
}

// checkReadyz asks the apiserver's /readyz as the admin. The CA file exists
// only once the apiserver has written its certificate, so the client is built
// on the first poll that finds it.
func (k *Kube) checkReadyz(ctx context.Context) error {
	if k.readyz == nil {
		hc, err := fixture.HTTPClient(k.caFile)
		if err != nil {
			return fmt.Errorf("serving certificate not written yet: %w", err)
		}
		k.readyz = hc
	}
	return fixture.GetOK(ctx, k.readyz, k.host()+"/readyz", "Authorization", "Bearer "+k.token)
}

func (k *Kube) host() string { return "https://127.0.0.1:" + strconv.Itoa(k.apiPort) }

func (k *Kube) makeClients() error {
	k.config = &rest.Config{
		Host:            k.host(),
		BearerToken:     k.token,
		TLSClientConfig: rest.TLSClientConfig{CAFile: k.caFile},
		// client-go's default of 5 QPS throttles tests that create many
		// objects; a private apiserver can take far more.
		QPS:   1000,
		Burst: 1000,
	}
	cs, err := kubernetes.NewForConfig(k.config)
	if err != nil {
		return fmt.Errorf("clientset: %w", err)
	}
	k.clientset = cs

	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["testenv"] = &clientcmdapi.Cluster{Server: k.host(), CertificateAuthority: k.caFile}
	cfg.AuthInfos["testenv-admin"] = &clientcmdapi.AuthInfo{Token: k.token}
	cfg.Contexts["testenv"] = &clientcmdapi.Context{Cluster: "testenv", AuthInfo: "testenv-admin"}
	cfg.CurrentContext = "testenv"
	k.kubeconfig = k.path("kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, k.kubeconfig); err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	return nil
}

// Config returns a fresh copy of the admin's client configuration (member of
// system:masters), so callers may change it freely.
func (k *Kube) Config() *rest.Config { return rest.CopyConfig(k.config) }

// Kubeconfig returns the path of a kubeconfig file for the admin.
func (k *Kube) Kubeconfig() string { return k.kubeconfig }

// Clientset returns a clientset acting as the admin.
func (k *Kube) Clientset() kubernetes.Interface { return k.clientset }

// Host returns the apiserver's URL.
func (k *Kube) Host() string { return k.host() }

// CAFile returns the path of the PEM file that verifies the apiserver.
func (k *Kube) CAFile() string { return k.caFile }

// Stop stops the apiserver, leaving etcd running, to test how callers behave
// during an outage. Start brings it back with the same port and data.
func (k *Kube) Stop(t testing.TB) {
	t.Helper()
	if k.apiserver == nil || k.apiserver.Exited() {
		t.Fatalf("testenv: Stop: kube-apiserver is not running")
	}
	k.apiserver.Stop(stopGrace)
}

// Start restarts the apiserver after Stop on the same port and etcd, and waits
// until it is ready. Tokens issued before the outage stay valid: the signing
// key is the same.
func (k *Kube) Start(t testing.TB) {
	t.Helper()
	if k.apiserver != nil && !k.apiserver.Exited() {
		t.Fatalf("testenv: Start: kube-apiserver is already running")
	}
	if err := k.startAPIServer(false); err != nil {
		t.Fatalf("testenv: restarting kube-apiserver: %v", err) // the cleanup prints the log
	}
	t.Logf("testenv: kube-apiserver restarted in %v", k.apiserverStartedFor.Round(time.Millisecond))
}

func (k *Kube) stopAll() {
	if k.apiserver != nil {
		k.apiserver.Stop(stopGrace)
	}
	if k.etcd != nil {
		k.etcd.Stop(stopGrace)
	}
}

func (k *Kube) logTails(t testing.TB) {
	for _, p := range []*fixture.Process{k.etcd, k.apiserver} {
		if p != nil {
			t.Logf("testenv: last lines of %s log:\n%s", p.Name(), p.Tail(logTailLines))
		}
	}
}
