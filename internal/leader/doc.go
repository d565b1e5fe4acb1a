// Package leader elects one leader among meshca server replicas. The
// leader drives root rotation and writes the CA journal; followers keep
// issuing from what the journal says.
//
// Two Electors share one shape: Lease, a coordination.k8s.io Lease through
// client-go's leader election, for replicas in a cluster; and FileLock, an
// flock on a file, for development and single-machine installs.
//
// Leadership is advisory. Neither elector fences: a leader that stalls
// (a long GC pause, a frozen VM) may act for a moment after its lease has
// passed to another replica. Whatever must be exclusive has to be guarded
// by its store as well, as the CA journal is by its compare-and-swap
// (ca.ErrJournalConflict): the leader writes, and a write from a stale
// leader fails instead of overwriting.
package leader
