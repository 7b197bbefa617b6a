package caddytest

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// A config reload does not wait for the old sites' requests: Caddy's http app
// waits for its servers' shutdown only when the process exits (app.go,
// stop(exiting=false)). A kayle_webhook delivery answers before its record
// write and unlock, so a test could end, and its storage folder be removed,
// while a stopped site still writes to it. Every site the harness loads
// counts its open connections through this listener wrapper, and
// harness.stop waits until they are all closed: net/http's Shutdown closes a
// connection only once its handler has returned.
func init() {
	caddy.RegisterModule(siteConnCounter{})
}

// openSiteConns is the number of connections the harness's sites accepted
// and have not closed yet (the in-process Caddy runs one test at a time).
var openSiteConns atomic.Int64

type siteConnCounter struct{}

func (siteConnCounter) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.listeners.kayle_test_conn_counter",
		New: func() caddy.Module { return siteConnCounter{} },
	}
}

func (siteConnCounter) WrapListener(l net.Listener) net.Listener {
	return countingListener{l}
}

type countingListener struct{ net.Listener }

func (l countingListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	openSiteConns.Add(1)
	return &countedConn{Conn: conn}, nil
}

type countedConn struct {
	net.Conn
	closeOnce sync.Once
}

func (c *countedConn) Close() error {
	err := c.Conn.Close()
	c.closeOnce.Do(func() { openSiteConns.Add(-1) })
	return err
}

// CloseWrite keeps net/http's half-close before it closes a connection whose
// request body it did not read, so the client still reads the answer.
func (c *countedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// waitSiteConnsClosed waits until every connection to a stopped site is
// closed, so that no handler of it is still running.
func waitSiteConnsClosed(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for openSiteConns.Load() > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("%d connections to stopped sites still open after %s: a handler is still running", openSiteConns.Load(), timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

// countSiteConns adds the counting listener wrapper to every HTTP server of
// a JSON config.
func countSiteConns(config []byte) ([]byte, error) {
	var cfg map[string]any
	if err := json.Unmarshal(config, &cfg); err != nil {
		return nil, err
	}
	apps, _ := cfg["apps"].(map[string]any)
	httpApp, _ := apps["http"].(map[string]any)
	servers, _ := httpApp["servers"].(map[string]any)
	if len(servers) == 0 {
		return config, nil
	}
	for name, srv := range servers {
		server, ok := srv.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("server %q is not an object", name)
		}
		wrappers, _ := server["listener_wrappers"].([]any)
		server["listener_wrappers"] = append(wrappers, map[string]any{"wrapper": "kayle_test_conn_counter"})
	}
	return json.Marshal(cfg)
}

// The harness's promise behind every test's storage clean-up: stop returns
// only after the stopped sites' handlers have returned. Without the counter,
// stop returns at once while the delivery still waits for its backend.
func TestStopWaitsForARunningDelivery(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	h.load(gw.caddyfile())

	reached, release := make(chan struct{}), make(chan struct{})
	// the backend's Close waits for its handler: release it even when the
	// test fails
	releaseBackend := sync.OnceFunc(func() { close(release) })
	t.Cleanup(releaseBackend)
	be.mu.Lock()
	be.respond = func(w http.ResponseWriter, r *http.Request, n int) {
		close(reached)
		<-release
		_, _ = w.Write([]byte(`{"received":true}`))
	}
	be.mu.Unlock()
	req := deliver(t, gw.url(), newEvent(t, nil)) // built here: t.Fatal belongs to the test's goroutine
	delivered := make(chan error, 1)
	go func() {
		resp, err := h.tc.Client.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		delivered <- err
	}()
	select {
	case <-reached:
	case err := <-delivered:
		t.Fatalf("the delivery ended before it reached the backend: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the delivery never reached the backend")
	}

	stopped := make(chan struct{})
	go func() { h.stop(); close(stopped) }()
	select {
	case <-stopped:
		t.Fatal("stop returned while a delivery's handler was still running")
	case <-time.After(500 * time.Millisecond):
	}
	releaseBackend()
	<-stopped
	if err := <-delivered; err != nil {
		t.Errorf("the delivery in flight during the stop failed: %v", err)
	}
}
