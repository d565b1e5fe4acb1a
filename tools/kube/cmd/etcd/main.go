// Command etcd is etcd's own server entry point, built from the pinned
// go.etcd.io/etcd/server/v3 module so the test environment needs no
// distribution package and gets the same etcd version kubernetes v1.36.3 uses.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
