package admin

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// Client calls the admin API.
type Client struct {
	base  string
	hc    *http.Client
	token func() (string, error)
}

// NewUnixClient talks to the admin socket at path.
func NewUnixClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}
	return &Client{base: "http://meshca-admin", hc: &http.Client{Transport: tr, Timeout: time.Minute}}
}

// NewRemoteClient talks to the admin API at baseURL (https://host:port)
// over TLS trusting roots, sending the bearer token that token returns.
func NewRemoteClient(baseURL string, roots *x509.CertPool, serverName string, token func() (string, error)) (*Client, error) {
	if !strings.HasPrefix(baseURL, "https://") {
		return nil, fmt.Errorf("admin: %q: the admin API is served over https only", baseURL)
	}
	if token == nil {
		return nil, errors.New("admin: a bearer token is needed for a remote server")
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12}}
	return &Client{base: strings.TrimSuffix(baseURL, "/"), hc: &http.Client{Transport: tr, Timeout: time.Minute}, token: token}, nil
}

// APIError is an error answer from the server.
type APIError struct {
	HTTPStatus int
	Body       ErrorBody
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s (%s)", e.Body.Error, e.Body.Code)
}

// Do sends in (nil for no body) and decodes the answer into out. An error
// answer is an *APIError; when it carries a status and out is not nil, the
// status is decoded into out as well.
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("admin: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return fmt.Errorf("admin: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	if c.token != nil {
		tok, err := c.token()
		if err != nil {
			return fmt.Errorf("admin: credentials: %w", err)
		}
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("admin: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("admin: reading the answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		apiErr := &APIError{HTTPStatus: resp.StatusCode}
		if err := json.Unmarshal(data, &apiErr.Body); err != nil || apiErr.Body.Error == "" {
			apiErr.Body = ErrorBody{Error: strings.TrimSpace(string(data)), Code: http.StatusText(resp.StatusCode)}
		}
		if out != nil && len(apiErr.Body.Status) > 0 {
			_ = json.Unmarshal(apiErr.Body.Status, out)
		}
		return apiErr
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("admin: decoding the answer: %w", err)
	}
	return nil
}
