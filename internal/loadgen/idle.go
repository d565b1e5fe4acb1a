package loadgen

import (
	"context"
	"os"
	"strconv"
	"strings"
	"time"
)

// idleWindow is how long Run watches the machine before it starts.
const idleWindow = 500 * time.Millisecond

// cpuIdle reports the fraction of CPU time spent idle over d, from Linux's
// /proc/stat. ok is false elsewhere, or if ctx ends first.
func cpuIdle(ctx context.Context, d time.Duration) (idle float64, ok bool) {
	idle0, total0, ok := readCPUStat()
	if !ok {
		return 0, false
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return 0, false
	case <-t.C:
	}
	idle1, total1, ok := readCPUStat()
	if !ok || total1 <= total0 {
		return 0, false
	}
	return float64(idle1-idle0) / float64(total1-total0), true
}

// readCPUStat returns the idle (idle plus iowait) and total jiffies of the
// "cpu" line of /proc/stat: user nice system idle iowait irq softirq steal.
func readCPUStat() (idle, total uint64, ok bool) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, false
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, 0, false
	}
	for i, s := range f[1:9] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, 0, false
		}
		total += v
		if i == 3 || i == 4 {
			idle += v
		}
	}
	return idle, total, true
}
