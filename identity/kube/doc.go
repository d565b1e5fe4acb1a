// Package kube authenticates workloads by their Kubernetes service-account
// tokens, using the API server's TokenReview API.
//
// It pins the audiences it asks the API server to check and checks the
// audiences the API server answers with, so a token minted for another
// service (or an API server that ignores audiences) never passes. Successful
// reviews are cached for no longer than the token itself lives, concurrent
// reviews of one token share a single API call, and failures are never
// cached. When the API server cannot be reached, cached identities keep
// working and new tokens are refused as unavailable, not as invalid.
package kube
