package sds

import (
	"runtime"
	"sync"
)

// pusher runs the pushes that source changes trigger, on a few goroutines
// for all streams rather than one more per stream. Workers start when there
// is work and exit when the queue is empty, so there is nothing to run or
// stop.
type pusher struct {
	max int

	mu      sync.Mutex
	queue   []*stream
	workers int
}

func newPusher() *pusher {
	// Sends rarely block (a stream has at most one response outstanding,
	// far below gRPC's per-stream write quota), so a few workers per core
	// keep every core busy during a bundle change.
	return &pusher{max: max(4, 2*runtime.GOMAXPROCS(0))}
}

// enqueue schedules a push to st; a stream already queued is not queued
// twice, and the push reads the newest snapshot whenever it runs.
func (p *pusher) enqueue(st *stream) {
	if !st.queued.CompareAndSwap(false, true) {
		return
	}
	p.mu.Lock()
	p.queue = append(p.queue, st)
	start := p.workers < p.max
	if start {
		p.workers++
	}
	p.mu.Unlock()
	if start {
		go p.work()
	}
}

func (p *pusher) work() {
	for {
		p.mu.Lock()
		if len(p.queue) == 0 {
			p.queue = nil // release the backing array after a burst
			p.workers--
			p.mu.Unlock()
			return
		}
		st := p.queue[0]
		p.queue[0] = nil
		p.queue = p.queue[1:]
		p.mu.Unlock()

		st.queued.Store(false)
		st.mu.Lock()
		if err := st.push(); err != nil {
			// The handler sees the broken stream on its next Recv and ends it.
			st.srv.log.Debug("push failed", "peer", st.peer.ID.String(), "addr", st.peer.Addr, "err", err)
		}
		st.mu.Unlock()
	}
}
