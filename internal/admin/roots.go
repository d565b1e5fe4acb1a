package admin

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/rotation"
)

// RootRotation is the root rotation the API drives: *rotation.Rotator.
type RootRotation interface {
	Status(ctx context.Context) (rotation.Status, error)
	Step(ctx context.Context, step ca.Step, opts rotation.Options) (rotation.Status, error)
}

// StepRequest is the body of POST /v1/roots/{step}.
type StepRequest struct {
	// MinAcked is the share of proxies that must have ACKed the new root
	// before activate (0: the server's default).
	MinAcked float64 `json:"minAcked,omitempty"`
	// Force takes the step although its gate is closed.
	Force bool `json:"force,omitempty"`
}

// RootRoutes serves root rotation:
//
//	GET  /v1/roots                       the rotation status
//	POST /v1/roots/{prepare,activate,retire}   one step, body StepRequest
func RootRoutes(rr RootRotation) []Route {
	routes := []Route{{
		Method: http.MethodGet, Path: "/v1/roots", Action: GetRoots, Target: "roots",
		Handler: func(ctx context.Context, _ *http.Request) (any, error) { return rootErr(rr.Status(ctx)) },
	}}
	for _, step := range []ca.Step{ca.StepPrepare, ca.StepActivate, ca.StepRetire} {
		routes = append(routes, Route{
			Method: http.MethodPost, Path: "/v1/roots/" + string(step), Action: RotateRoots, Mutates: true, Target: "roots/" + string(step),
			Handler: func(ctx context.Context, r *http.Request) (any, error) {
				var req StepRequest
				if err := DecodeBody(r, &req); err != nil {
					return nil, err
				}
				if req.MinAcked < 0 || req.MinAcked > 1 {
					return nil, fmt.Errorf("%w: minAcked %g is not a fraction in (0, 1]", ErrInvalid, req.MinAcked)
				}
				return rootErr(rr.Step(ctx, step, rotation.Options{MinAcked: req.MinAcked, Force: req.Force}))
			},
		})
	}
	return routes
}

// rootErr maps rotation errors to API errors, keeping the status so a
// refusal shows what blocks it.
func rootErr(st rotation.Status, err error) (any, error) {
	switch {
	case err == nil:
		return st, nil
	case errors.Is(err, rotation.ErrBlocked), errors.Is(err, ca.ErrRotationPhase), errors.Is(err, ca.ErrRotationUnsupported),
		errors.Is(err, rotation.ErrNotLeader), errors.Is(err, ca.ErrJournalConflict):
		return statusOrNil(st), fmt.Errorf("%w: %w", ErrConflict, err)
	default:
		return statusOrNil(st), fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
}

func statusOrNil(st rotation.Status) any {
	if st.Phase == "" {
		return nil
	}
	return st
}
