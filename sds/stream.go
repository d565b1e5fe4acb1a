package sds

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// protocol is the xDS variant of a stream.
type protocol int

const (
	sotw  protocol = iota // state of the world: StreamSecrets
	delta                 // incremental: DeltaSecrets
)

func (p protocol) String() string {
	if p == delta {
		return "delta"
	}
	return "sotw"
}

// sub is one resource on one stream.
type sub struct {
	// sent is the last version sent, whether ACKed, NACKed or awaiting an
	// answer: the server sends a version once per stream.
	sent *resource
	// acked is the last version the proxy ACKed.
	acked *resource
	// claimed is the version the proxy said it already had when the
	// stream opened (version_info, initial_resource_versions); it counts as
	// ACKed if it is the current one.
	claimed    string
	subscribed bool
	// force sends the resource even at a version already sent: a delta
	// proxy that subscribes must get the resource (it may have dropped it).
	force bool
}

// stream is one proxy's SDS stream. Its handler goroutine (gRPC's) reads
// requests; pushes after a source change run on the server's pusher. Both
// hold mu, so responses are sent one at a time, and there is at most one
// response awaiting its ACK or NACK: the next one waits for it. That keeps
// ACK accounting exact and bounds what a slow proxy can make the server
// buffer to one response.
type stream struct {
	srv    *Server
	proto  protocol
	ctx    context.Context
	since  time.Time
	queued atomic.Bool // on the pusher's queue

	mu        sync.Mutex
	peer      Peer
	sendSotw  func(*discoveryv3.DiscoveryResponse) error
	sendDelta func(*discoveryv3.DeltaDiscoveryResponse) error
	started   bool // the first request was accepted
	done      bool
	watcher   Watcher
	want      Want
	subs      [numKinds]sub
	lastNACK  string

	nonce    string // of the last response sent
	awaiting bool   // that response is not yet ACKed or NACKed
	inflight struct {
		res     [numKinds]*resource
		removed [numKinds]bool
		version string
	}
	// removeNames are names the proxy holds that this server does not
	// serve, reported in the next delta response.
	removeNames []string
}

// notify is the stream's Source callback.
func (st *stream) notify() { st.srv.pusher.enqueue(st) }

// handleSotw processes one state-of-the-world request.
func (st *stream) handleSotw(req *discoveryv3.DiscoveryRequest) error {
	if err := checkTypeURL(req.GetTypeUrl()); err != nil {
		return err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	nonce := req.GetResponseNonce()
	if st.started && nonce != "" && nonce != st.nonce {
		// A request written before our latest response: that response
		// supersedes whatever it says.
		st.srv.metrics.stale.Inc()
		return nil
	}
	want, err := kindsOf(req.GetResourceNames())
	if err != nil {
		return err
	}
	if !st.started {
		if len(req.GetResourceNames()) == 0 {
			return errWildcard
		}
		st.peer.Node = req.GetNode().GetId()
		// A reconnecting proxy reports in version_info what it had: if that
		// is current, it is not sent again and counts as ACKed.
		claimed := parseVersion(req.GetVersionInfo())
		for k := range st.subs {
			if want[k] {
				st.subs[k].claimed = claimed[k]
			}
		}
	}
	if nonce != "" && nonce == st.nonce && st.awaiting {
		switch {
		case req.GetErrorDetail() != nil:
			st.nack(req.GetErrorDetail().GetMessage())
		case req.GetVersionInfo() != st.inflight.version:
			st.nack(fmt.Sprintf("ACK of response %s carried version %q, the response had %q",
				nonce, req.GetVersionInfo(), st.inflight.version))
		default:
			st.ack()
		}
	}
	// Every state-of-the-world request lists the whole subscription.
	for k := range st.subs {
		st.subscribe(kind(k), want[k], false)
	}
	st.started = true
	if err := st.watch(); err != nil {
		return err
	}
	return st.push()
}

// handleDelta processes one incremental request.
func (st *stream) handleDelta(req *discoveryv3.DeltaDiscoveryRequest) error {
	if err := checkTypeURL(req.GetTypeUrl()); err != nil {
		return err
	}
	add, err := kindsOf(req.GetResourceNamesSubscribe())
	if err != nil {
		return err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if !st.started {
		if len(req.GetResourceNamesSubscribe()) == 0 {
			return errWildcard
		}
		st.peer.Node = req.GetNode().GetId()
		for n, v := range req.GetInitialResourceVersions() {
			k, ok := kindOf(n)
			switch {
			case !ok:
				st.removeNames = append(st.removeNames, n)
			case add[k]:
				st.subs[k].claimed = v
			}
		}
	}
	// Subscription changes stand on their own; only the (N)ACK part of a
	// request depends on its nonce.
	if nonce := req.GetResponseNonce(); nonce != "" {
		switch {
		case nonce != st.nonce || !st.awaiting:
			st.srv.metrics.stale.Inc()
		case req.GetErrorDetail() != nil:
			st.nack(req.GetErrorDetail().GetMessage())
		default:
			st.ack()
		}
	}
	for _, n := range req.GetResourceNamesUnsubscribe() {
		if k, ok := kindOf(n); ok {
			st.subscribe(k, false, false)
		}
	}
	for k := range add {
		if add[k] {
			// On the first request initial_resource_versions decides;
			// later, a subscription always gets the resource.
			st.subscribe(kind(k), true, st.started)
		}
	}
	st.started = true
	if err := st.watch(); err != nil {
		return err
	}
	return st.push()
}

// subscribe records interest in k; resend forces the next push to include it.
func (st *stream) subscribe(k kind, on, resend bool) {
	s := &st.subs[k]
	if on {
		if !s.subscribed {
			st.srv.watching(k, 1)
			st.srv.noteChange()
		}
		s.subscribed = true
		s.force = s.force || resend
		return
	}
	if !s.subscribed {
		return
	}
	// The proxy drops what it had; it no longer counts.
	st.setAcked(k, nil)
	*s = sub{}
	st.srv.watching(k, -1)
	st.srv.noteChange()
}

func (st *stream) setAcked(k kind, r *resource) {
	s := &st.subs[k]
	if s.acked == r {
		return
	}
	switch k {
	case kindRoots:
		var old, next []string
		if s.acked != nil {
			old = s.acked.roots
		}
		if r != nil {
			next = r.roots
		}
		st.srv.moveRootAcks(old, next)
	case kindPolicy:
		var old, next string
		if s.acked != nil {
			old = s.acked.version
		}
		if r != nil {
			next = r.version
		}
		st.srv.movePolicyAck(old, next)
	}
	s.acked = r
}

func (st *stream) ack() {
	st.awaiting = false
	for k := range st.subs {
		r, removed := st.inflight.res[k], st.inflight.removed[k]
		if (r == nil && !removed) || !st.subs[k].subscribed {
			continue
		}
		st.setAcked(kind(k), r)
		st.srv.metrics.acks[k].Inc()
	}
	st.inflight.res, st.inflight.removed = [numKinds]*resource{}, [numKinds]bool{}
	st.srv.noteChange()
}

// nack keeps what the proxy ACKed before. The rejected version stays
// recorded as sent, so it is not sent again; the next change is.
func (st *stream) nack(msg string) {
	st.awaiting = false
	if msg == "" {
		msg = "(NACK without a message)"
	}
	st.lastNACK = msg
	for k := range st.subs {
		if st.inflight.res[k] != nil || st.inflight.removed[k] {
			st.srv.metrics.nacks[k].Inc()
		}
	}
	st.inflight.res, st.inflight.removed = [numKinds]*resource{}, [numKinds]bool{}
	st.srv.noteChange()
	st.srv.log.Warn("proxy rejected secrets", "peer", st.peer.ID.String(), "node", st.peer.Node,
		"addr", st.peer.Addr, "error", msg)
}

// rejected returns the version of k last sent if the proxy rejected the
// response that carried it, nil otherwise. st.mu is held.
func (st *stream) rejected(k kind) *resource {
	s := &st.subs[k]
	switch {
	case s.sent == nil, s.acked != nil && s.acked.version == s.sent.version:
		return nil
	case st.awaiting && st.inflight.res[k] == s.sent:
		return nil // not answered yet
	}
	// nack keeps the rejected version as sent and the ACKed one as acked.
	return s.sent
}

// watch starts or widens the stream's watch on the source. Interest only
// grows: a proxy that drops a secret rarely stays without it.
func (st *stream) watch() error {
	want := Want{
		Cert:   st.want.Cert || st.subs[kindCert].subscribed,
		Roots:  st.want.Roots || st.subs[kindRoots].subscribed,
		Policy: st.want.Policy || st.subs[kindPolicy].subscribed,
	}
	if st.watcher != nil && want == st.want {
		return nil
	}
	w, err := st.srv.src.Watch(st.ctx, st.peer, want, st.notify)
	if err != nil {
		return watchError(err)
	}
	if st.watcher != nil {
		st.watcher.Close()
	}
	st.watcher, st.want = w, want
	return nil
}

// push sends what the proxy lacks, if no response is awaiting an answer.
// st.mu is held.
func (st *stream) push() error {
	if st.done || st.awaiting || st.watcher == nil {
		return nil
	}
	snap := st.watcher.Snapshot()
	if snap == nil {
		return nil
	}
	var out [numKinds]*resource
	var removed [numKinds]bool
	n := len(st.removeNames)
	for i := range st.subs {
		k, s := kind(i), &st.subs[i]
		if !s.subscribed {
			continue
		}
		cur, err := st.srv.enc.get(k, snap)
		if err != nil {
			// The source handed over something unservable; nothing better
			// to send than what the proxy has.
			st.srv.log.Error("cannot encode secret", "resource", names[k], "peer", st.peer.ID.String(), "err", err)
			continue
		}
		if cur == nil {
			if st.proto == delta && (s.sent != nil || s.claimed != "") {
				removed[k] = true
				n++
			}
			continue
		}
		if s.claimed != "" {
			if s.claimed == cur.version {
				s.sent = cur
				st.setAcked(k, cur)
				st.srv.noteChange()
			}
			s.claimed = ""
		}
		switch {
		case s.force:
		case s.sent != nil && s.sent.version == cur.version:
			continue
		case s.acked != nil && s.acked.version == cur.version:
			// The proxy rejected a newer version and kept this one.
			s.sent = s.acked
			continue
		}
		out[k] = cur
		n++
	}
	// The policy goes out in a response of its own: an ACK or NACK answers
	// a whole response, and a proxy's verdict on the policy must not be
	// taken for its verdict on the secrets (a rejected policy would hold up
	// a root rotation's count), nor the other way round. It follows once
	// the proxy has answered the secrets.
	if out[kindPolicy] != nil || removed[kindPolicy] {
		for k := range numKinds {
			if k.isSecret() && (out[k] != nil || removed[k]) {
				out[kindPolicy], removed[kindPolicy] = nil, false
				n--
				break
			}
		}
	}
	if n == 0 {
		return nil
	}
	nonce := strconv.FormatUint(st.srv.nonces.Add(1), 36)
	version := st.clientVersion(out)
	var err error
	if st.proto == sotw {
		resp := &discoveryv3.DiscoveryResponse{TypeUrl: TypeURL, VersionInfo: version, Nonce: nonce,
			Resources: make([]*anypb.Any, 0, n)}
		for _, r := range out {
			if r != nil {
				resp.Resources = append(resp.Resources, r.any)
			}
		}
		err = st.sendSotw(resp)
	} else {
		resp := &discoveryv3.DeltaDiscoveryResponse{TypeUrl: TypeURL, SystemVersionInfo: version, Nonce: nonce,
			RemovedResources: st.removeNames}
		for k, r := range out {
			if r != nil {
				resp.Resources = append(resp.Resources, r.delta)
			}
			if removed[k] {
				resp.RemovedResources = append(resp.RemovedResources, names[k])
			}
		}
		err = st.sendDelta(resp)
	}
	if err != nil {
		st.done = true
		return fmt.Errorf("sds: send: %w", err)
	}
	st.nonce, st.awaiting = nonce, true
	st.inflight.res, st.inflight.removed, st.inflight.version = out, removed, version
	st.removeNames = nil
	for k, r := range out {
		s := &st.subs[k]
		if r != nil {
			s.sent, s.force = r, false
			st.srv.metrics.pushes[k].Inc()
		}
		if removed[k] {
			s.sent, s.claimed = nil, ""
			st.srv.metrics.pushes[k].Inc()
		}
	}
	return nil
}

// clientVersion is the version_info of a response: the version of each
// subscribed resource the proxy will have once it applies out.
func (st *stream) clientVersion(out [numKinds]*resource) string {
	var have [numKinds]*resource
	for k, s := range st.subs {
		if !s.subscribed {
			continue
		}
		have[k] = out[k]
		if have[k] == nil {
			have[k] = s.acked
		}
	}
	return formatVersion(have)
}

// formatVersion spells out each resource's version,
// "default=<version>,ROOTCA=<version>", so a reconnecting proxy's
// version_info says exactly what it has.
func formatVersion(have [numKinds]*resource) string {
	var b strings.Builder
	for k, r := range have {
		if r == nil {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(names[k])
		b.WriteByte('=')
		b.WriteString(r.version)
	}
	return b.String()
}

// parseVersion reads what clientVersion wrote; anything else claims nothing.
func parseVersion(v string) [numKinds]string {
	var out [numKinds]string
	for part := range strings.SplitSeq(v, ",") {
		name, ver, ok := strings.Cut(part, "=")
		if k, known := kindOf(name); ok && known {
			out[k] = ver
		}
	}
	return out
}

// close ends the stream's accounting. The stream leaves Status before its
// subscriptions leave the counts, so whoever sees the counts drop (woken by
// AckChanged) no longer finds it among the streams.
func (st *stream) close() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.done = true
	if st.watcher != nil {
		st.watcher.Close()
	}
	st.srv.remove(st)
	for k := range st.subs {
		st.subscribe(kind(k), false, false)
	}
}
