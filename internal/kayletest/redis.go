package kayletest

import (
	"bufio"
	"context"
	"errors"
	"net"
	"strings"
	"time"
)

// RedisPing succeeds once the redis-server at addr answers PING (not while
// it still loads its data, when it answers -LOADING): for the storage
// matrix and the bench, which start their own servers.
func RedisPing(ctx context.Context, addr string) error {
	d := net.Dialer{Timeout: time.Second}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != "+PONG" {
		return errors.New("PING answered " + strings.TrimSpace(line))
	}
	return nil
}
