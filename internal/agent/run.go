package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
)

// Run serves SDS on the socket, obtains and renews the certificate and
// follows the server's trust bundle (and, with EnvoyConfigDir, its mTLS
// policy) until ctx ends, then removes the socket.
// It returns an error only when the socket cannot be served; an unreachable
// server is retried, never fatal. Run may be called once.
func (a *Agent) Run(ctx context.Context) error {
	if !a.running.CompareAndSwap(false, true) {
		return errors.New("agent: Run called twice")
	}
	sock, err := listenUnix(a.cfg.SocketPath)
	if err != nil {
		return err
	}
	defer sock.remove()
	a.log.Info("serving SDS", "socket", a.cfg.SocketPath, "server", a.cfg.ServerAddr)

	// The initial roots go out at once: a proxy can validate peers while
	// its own certificate is on its way.
	a.mu.Lock()
	a.next = a.clock.Now()
	a.publish()
	a.mu.Unlock()

	gs := grpc.NewServer()
	a.sds.Register(gs)
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		err := gs.Serve(sock.lis)
		// A shutdown that comes before Serve starts makes it return
		// ErrServerStopped: that is the end asked for, not a failure.
		if err != nil && !(errors.Is(err, grpc.ErrServerStopped) && ctx.Err() != nil) {
			return fmt.Errorf("agent: serve SDS: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		// Stop, not GracefulStop: SDS streams never end by themselves.
		gs.Stop()
		return nil
	})
	g.Go(func() error { a.renew(ctx); return nil })
	g.Go(func() error { a.followBundle(ctx); return nil })
	if a.enforce != nil {
		g.Go(func() error { a.awaitPolicy(ctx); return nil })
	}
	return g.Wait()
}

// unixSocket is the SDS listener and the file it is bound to.
type unixSocket struct {
	lis  net.Listener
	path string
	fi   fs.FileInfo
}

// listenUnix binds the socket at path, mode 0600, in a directory created
// 0700 when missing. A stale socket of an earlier run is replaced; a socket
// something still listens on, or a file that is not a socket, is not.
func listenUnix(path string) (*unixSocket, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("agent: socket directory: %w", err)
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	// Bind under a temporary name and rename once the mode is 0600, so the
	// socket is never reachable at path with the umask's looser mode.
	tmp := filepath.Join(dir, "."+filepath.Base(path)+"."+strconv.Itoa(os.Getpid())+".tmp")
	_ = os.Remove(tmp) // left by a crashed run that had our pid
	lis, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("agent: listen on %s: %w", path, err)
	}
	// The file is removed by name in remove, once we know it is ours.
	lis.(*net.UnixListener).SetUnlinkOnClose(false)
	fail := func(err error) (*unixSocket, error) {
		lis.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("agent: socket %s: %w", path, err)
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	return &unixSocket{lis: lis, path: path, fi: fi}, nil
}

func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("agent: socket: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("agent: %s exists and is not a socket; refusing to replace it", path)
	}
	// A socket that accepts belongs to a live process, most likely another
	// agent for the same proxy: two would fight over it.
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("agent: %s is in use by another process", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("agent: remove stale socket: %w", err)
	}
	return nil
}

// remove closes the listener and deletes the socket file, unless another
// process has put its own there since.
func (s *unixSocket) remove() {
	s.lis.Close()
	if fi, err := os.Lstat(s.path); err == nil && os.SameFile(fi, s.fi) {
		os.Remove(s.path)
	}
}
