package sdstest

import "context"

// TB is the part of testing.TB a Holder uses; sdstest is also built into
// meshca itself, which should not link the testing package.
type TB interface {
	Helper()
	Fatal(args ...any)
}

// Holder hands each response a client receives to the test, and lets the
// client answer it only when the test says so. Set Config.Hold to its Hold
// method.
type Holder struct {
	held    chan Response
	release chan struct{}
}

// NewHolder returns a Holder that holds nothing yet.
func NewHolder() *Holder {
	return &Holder{held: make(chan Response), release: make(chan struct{})}
}

// Hold is a Config.Hold: it hands r to Take and waits for Answer.
func (h *Holder) Hold(ctx context.Context, r Response) {
	select {
	case h.held <- r:
	case <-ctx.Done():
		return
	}
	select {
	case <-h.release:
	case <-ctx.Done():
	}
}

// Take waits for the next response and keeps its answer back.
func (h *Holder) Take(tb TB, ctx context.Context) Response {
	tb.Helper()
	select {
	case r := <-h.held:
		return r
	case <-ctx.Done():
		tb.Fatal("no response reached the client")
		return Response{}
	}
}

// Answer lets the client answer the response taken.
func (h *Holder) Answer(tb TB, ctx context.Context) {
	tb.Helper()
	select {
	case h.release <- struct{}{}:
	case <-ctx.Done():
		tb.Fatal("the client did not take its answer")
	}
}

// Next waits for the next response and lets the client answer it.
func (h *Holder) Next(tb TB, ctx context.Context) Response {
	tb.Helper()
	r := h.Take(tb, ctx)
	h.Answer(tb, ctx)
	return r
}
