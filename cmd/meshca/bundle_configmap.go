package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/kubestate"
	"github.com/meshca/meshca/internal/leader"
)

// Retry bounds of publishBundle after a failed write.
const (
	publishRetryMin = time.Second
	publishRetryMax = 30 * time.Second
)

// bundlePublisher returns where `meshca server` publishes the trust
// bundle: the --bundle-configmap ConfigMap with the kube authenticator,
// nothing otherwise.
func (o *serverOptions) bundlePublisher(authn any) (*kubestate.BundleConfigMap, error) {
	k, isKube := authn.(*kubeAuth)
	if !isKube || o.bundleCM == "" {
		return nil, nil
	}
	return kubestate.NewBundleConfigMap(kubestate.BundleConfig{Client: k.client, Namespace: o.listen.namespace, Name: o.bundleCM})
}

// publishBundle keeps the trust bundle ConfigMap equal to the CA's bundle
// while this replica leads (always, without an elector). One writer: a follower that has not yet read
// the leader's latest rotation step would write an older bundle back.
func publishBundle(ctx context.Context, a *ca.Authority, el leader.Elector, pub *kubestate.BundleConfigMap, log *slog.Logger) error {
	retry := publishRetryMin
	for {
		var leadChanged <-chan struct{}
		if el != nil {
			leadChanged = el.Changed()
		}
		caChanged := a.Changed()
		var again <-chan time.Time
		if el == nil || el.IsLeader() {
			roots := a.Issuer().Roots
			wrote, err := pub.Publish(ctx, ca.EncodeCerts(roots...))
			switch {
			case err != nil:
				log.Warn("Publishing the trust bundle failed; retrying", "retry_in", retry, "err", err)
				again = time.After(retry)
				retry = min(2*retry, publishRetryMax)
			case wrote:
				retry = publishRetryMin
				log.Info("Published the trust bundle", "roots", len(roots))
			default:
				retry = publishRetryMin
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-caChanged:
		case <-leadChanged:
		case <-again:
		}
	}
}
