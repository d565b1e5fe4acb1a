// Package multicluster authenticates workloads of several Kubernetes
// clusters, each with its own TokenReview client, cache and informers,
// choosing the cluster by the ClusterID a workload's agent sends (as Istio's
// agent does). Clusters come from kubeconfig files given at start-up and
// from Secrets labelled meshca/multi-cluster=true, watched for changes: each
// data key of such a Secret is a cluster ID and its value that cluster's
// kubeconfig, as in the remote-cluster secrets of Istio multi-cluster.
//
// A token is only ever reviewed by the cluster it claims to come from: a
// token minted by one cluster and presented with another's ID fails review
// there. An ID nobody configured is refused as an unknown cluster.
package multicluster
