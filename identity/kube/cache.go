package kube

import (
	"container/list"
	"sync"
	"time"

	"github.com/meshca/meshca/identity"
)

// cache is a bounded LRU of reviewed identities with per-entry expiry.
type cache struct {
	mu    sync.Mutex
	max   int
	order *list.List // front = most recently used
	items map[string]*list.Element
}

type entry struct {
	key    string
	caller identity.Caller
	until  time.Time
}

func newCache(max int) *cache {
	return &cache{max: max, order: list.New(), items: make(map[string]*list.Element)}
}

func (c *cache) get(key string, now time.Time) (identity.Caller, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.items[key]
	if !ok {
		return identity.Caller{}, false
	}
	e := el.Value.(*entry)
	if !now.Before(e.until) {
		c.order.Remove(el)
		delete(c.items, key)
		return identity.Caller{}, false
	}
	c.order.MoveToFront(el)
	return e.caller, true
}

func (c *cache) put(key string, caller identity.Caller, until time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[key]; ok {
		el.Value = &entry{key: key, caller: caller, until: until}
		c.order.MoveToFront(el)
		return
	}
	c.items[key] = c.order.PushFront(&entry{key: key, caller: caller, until: until})
	for c.order.Len() > c.max {
		oldest := c.order.Back()
		c.order.Remove(oldest)
		delete(c.items, oldest.Value.(*entry).key)
	}
}

func (c *cache) remove(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[key]; ok {
		c.order.Remove(el)
		delete(c.items, key)
	}
}
