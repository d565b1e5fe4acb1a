package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshca/meshca/internal/caclient"
	"github.com/meshca/meshca/internal/testenv"
)

// startServer runs `meshca server` in-process with args until the test
// ends and returns its CA API address, read from its log.
func startServer(t testing.TB, args ...string) string {
	t.Helper()
	return startServerProc(t, args...).grpc
}

// serverProc is a `meshca server` running in-process.
type serverProc struct {
	grpc, monitor string
	logs          *syncBuffer
}

// startServerProc runs `meshca server` in-process with args until the test
// ends and learns its addresses from its log.
func startServerProc(t testing.TB, args ...string) *serverProc {
	t.Helper()
	logs := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := newRootCommand(io.Discard, logs)
	cmd.SetArgs(append([]string{"server", "--grpc-addr", "127.0.0.1:0", "--monitor-addr", "127.0.0.1:0", "--namespace", "meshca-system"}, args...))
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("meshca server: %v", err)
		}
	})
	re := regexp.MustCompile(`msg=serving grpc=(\S+) monitoring=(\S+)`)
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if m := re.FindStringSubmatch(logs.String()); m != nil {
			return &serverProc{grpc: m[1], monitor: m[2], logs: logs}
		}
		select {
		case err := <-done:
			t.Fatalf("meshca server exited: %v\n%s", err, logs.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("server did not start:\n%s", logs.String())
	return nil
}

// serverError runs `meshca server` with args, expecting it to refuse to
// start, and returns its error.
func serverError(t *testing.T, args ...string) error {
	t.Helper()
	cmd := newRootCommand(io.Discard, io.Discard)
	cmd.SetArgs(append([]string{"server", "--grpc-addr", "127.0.0.1:0", "--monitor-addr", "127.0.0.1:0", "--namespace", "meshca-system"}, args...))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := cmd.ExecuteContext(ctx)
	if err == nil {
		t.Fatalf("meshca server %s started", strings.Join(args, " "))
	}
	return err
}

func writeFile(t testing.TB, name string, data []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// tokenReviews is how many TokenReviews the API server has answered.
func tokenReviews(t testing.TB, env *testenv.Kube) float64 {
	t.Helper()
	return env.MetricValue(t, "apiserver_request_total", map[string]string{"resource": "tokenreviews"})
}

// TestServerWithTokenReview runs `meshca server` the way it runs in
// production, with TokenReview against a real API server, and the client
// flow with a token from the TokenRequest API.
func TestServerWithTokenReview(t *testing.T) {
	env := testenv.StartKube(t)
	env.CreateServiceAccount(t, "shop", "cart")
	pod := env.CreatePod(t, "shop", "cart-0", "cart")
	dir := t.TempDir()
	pass := writeFile(t, "pass", []byte("correct horse battery staple"))
	addr := startServer(t, "--data-dir", dir, "--keystore-passphrase-file", pass, "--kubeconfig", env.Kubeconfig(),
		"--bundle-out", filepath.Join(dir, "bundle.pem"), "--require-pod-bound")

	tok := writeFile(t, "token", []byte(env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, pod)))
	out := filepath.Join(t.TempDir(), "cart")
	printed := meshcaCmd(t, "cert", "--addr", addr, "--ca-bundle", filepath.Join(dir, "bundle.pem"), "--token-file", tok, "--out", out)
	if !strings.Contains(printed, "spiffe://cluster.local/ns/shop/sa/cart") {
		t.Fatalf("cert printed %q", printed)
	}
	svid, _ := loadSVID(t, out)
	if svid.ID.String() != "spiffe://cluster.local/ns/shop/sa/cart" {
		t.Fatalf("SVID ID %s", svid.ID)
	}

	t.Run("1,000 concurrent CSRs with one token make one TokenReview", func(t *testing.T) {
		bundle, err := caclient.LoadBundle(filepath.Join(dir, "bundle.pem"))
		if err != nil {
			t.Fatal(err)
		}
		client, err := caclient.New(caclient.Config{Address: addr, TrustBundle: bundle, Timeout: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		tok := env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, pod)
		before := tokenReviews(t, env)
		var wg sync.WaitGroup
		errs := make(chan error, 1000)
		for range 1000 {
			wg.Go(func() {
				creds, err := client.Fetch(context.Background(), caclient.Request{Token: tok})
				if err == nil && creds.ID.String() != "spiffe://cluster.local/ns/shop/sa/cart" {
					err = fmt.Errorf("issued to %s", creds.ID)
				}
				errs <- err
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if got := tokenReviews(t, env) - before; got != 1 {
			t.Fatalf("1,000 certificates cost %v TokenReviews, want 1", got)
		}
	})

	var errOut bytes.Buffer
	cmd := newRootCommand(io.Discard, &errOut)
	unbound := writeFile(t, "unbound", []byte(env.Token(t, "shop", "cart", []string{"meshca"}, time.Hour, nil)))
	cmd.SetArgs([]string{"cert", "--addr", addr, "--ca-bundle", filepath.Join(dir, "bundle.pem"), "--token-file", unbound, "--out", t.TempDir()})
	err := cmd.ExecuteContext(context.Background())
	if err == nil || !strings.Contains(err.Error(), "Unauthenticated") || !strings.Contains(err.Error(), "not bound to a pod") {
		t.Fatalf("unbound token with --require-pod-bound: %v", err)
	}
}

func TestServerRefusesToStartWithoutPermissions(t *testing.T) {
	env := testenv.StartKube(t)
	env.CreateServiceAccount(t, "meshca-system", "meshca")
	kc := writeFile(t, "kubeconfig", env.KubeconfigFor(t, "meshca-system", "meshca"))
	pass := writeFile(t, "pass", []byte("correct horse battery staple"))
	err := serverError(t, "--data-dir", t.TempDir(), "--keystore-passphrase-file", pass, "--kubeconfig", kc)
	if !strings.Contains(err.Error(), `cluster "Kubernetes": meshca's credentials lack permission to create tokenreviews.authentication.k8s.io (cluster-wide)`) {
		t.Fatalf("err = %v, want the missing permission named", err)
	}
	env.Grant(t, "meshca-system", "meshca", "system:auth-delegator")
	err = serverError(t, "--data-dir", t.TempDir(), "--keystore-passphrase-file", pass, "--kubeconfig", kc, "--no-binding-checks")
	if !strings.Contains(err.Error(), "lack permission to list secrets in namespace meshca-system, watch secrets in namespace meshca-system") ||
		!strings.Contains(err.Error(), "--remote-secrets=false") {
		t.Fatalf("err = %v, want the Secrets permission named", err)
	}
	// With exactly the permissions asked for, it starts.
	startServer(t, "--data-dir", t.TempDir(), "--keystore-passphrase-file", pass, "--kubeconfig", kc, "--no-binding-checks", "--remote-secrets=false")
}

func TestServerOutsideAClusterSaysWhatToDo(t *testing.T) {
	// Even when the tests themselves run in a pod.
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	pass := writeFile(t, "pass", []byte("correct horse battery staple"))
	err := serverError(t, "--data-dir", t.TempDir(), "--keystore-passphrase-file", pass)
	if !strings.Contains(err.Error(), "not running in a Kubernetes cluster and no --kubeconfig given") || !strings.Contains(err.Error(), "meshca dev") {
		t.Fatalf("err = %v", err)
	}
}

// TestDevWithKubeconfig runs `meshca dev` against a real API server: tokens
// from the TokenRequest API, reviewed with TokenReview.
func TestDevWithKubeconfig(t *testing.T) {
	env := testenv.StartKube(t)
	env.CreateServiceAccount(t, "default", "web")
	d := startDev(t, "--kubeconfig", env.Kubeconfig())
	tok := writeFile(t, "token", []byte(env.Token(t, "default", "web", []string{"meshca"}, time.Hour, nil)))
	out := filepath.Join(t.TempDir(), "web")
	printed := meshcaCmd(t, "cert", "--addr", d.grpcAddr, "--ca-bundle", filepath.Join(d.dataDir, "root-cert.pem"), "--token-file", tok, "--out", out)
	if !strings.Contains(printed, "spiffe://cluster.local/ns/default/sa/web") {
		t.Fatalf("cert printed %q", printed)
	}
	if _, err := os.Stat(filepath.Join(d.dataDir, devTokenKeyFile)); err == nil {
		t.Error("dev with a kubeconfig created a development token key anyway")
	}
	other := writeFile(t, "other", []byte(env.Token(t, "default", "web", []string{"vault"}, time.Hour, nil)))
	cmd := newRootCommand(io.Discard, io.Discard)
	cmd.SetArgs([]string{"cert", "--addr", d.grpcAddr, "--ca-bundle", filepath.Join(d.dataDir, "root-cert.pem"), "--token-file", other, "--out", t.TempDir()})
	if err := cmd.ExecuteContext(context.Background()); err == nil || !strings.Contains(err.Error(), "Unauthenticated") || !strings.Contains(err.Error(), "audiences") {
		t.Fatalf("token for another audience: %v", err)
	}
}
