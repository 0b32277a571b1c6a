package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vgonet/vgo/internal/childproc"
)

// msg is one JSON line between the parent and a child, in either direction.
// The parent sends one command at a time; the child answers each with a
// message of the same kind, or of kind kindError. A server also sends
// kindReady, unasked, once it listens.
type msg struct {
	Kind string `json:"kind"`
	Err  string `json:"err,omitempty"`

	// kindReady from a server; kindConnect to the client.
	Addr string `json:"addr,omitempty"`

	// kindConnect to the client.
	Scenario string        `json:"scenario,omitempty"`
	Conns    int           `json:"conns,omitempty"`
	Size     int           `json:"size,omitempty"`
	Interval time.Duration `json:"interval,omitempty"`

	// kindStop from the client.
	Report *clientReport `json:"report,omitempty"`

	// kindMem from a server.
	Mem *memReport `json:"mem,omitempty"`
}

// Message kinds.
const (
	kindReady   = "ready"   // server → parent: listening on Addr
	kindConnect = "connect" // parent → client: open the connections and start
	kindMark    = "mark"    // parent → client: the measuring window starts
	kindStop    = "stop"    // parent → client: the window ends; Report
	kindMem     = "mem"     // parent → server: collect garbage, then Mem
	kindQuit    = "quit"    // parent → child: exit, without a reply
	kindError   = "error"   // child → parent: the command failed
)

// clientReport is what the client measured over a window.
type clientReport struct {
	Count    int           `json:"count"`  // echoes or pongs received in the window
	Window   time.Duration `json:"window"` // from mark to stop, on the client's clock
	P50      time.Duration `json:"p50"`
	P99      time.Duration `json:"p99"`
	Errors   int           `json:"errors"` // connections that failed before the stop
	FirstErr string        `json:"first_err,omitempty"`
}

// memReport is the server's runtime's view of its memory, after two
// garbage collections.
type memReport struct {
	HeapAlloc  uint64 `json:"heap_alloc"`
	StackInuse uint64 `json:"stack_inuse"`
	Goroutines int    `json:"goroutines"`
	Conns      int    `json:"conns"` // connections open, past their handshake
}

// child is the parent's handle on one child process. Its reader goroutine,
// started with it, decodes the child's stdout until the child exits, then
// reaps it.
type child struct {
	name string
	log  *logrus.Entry
	cmd  *exec.Cmd
	enc  *json.Encoder
	pid  int

	replies chan msg
	exited  chan struct{} // closed once the child has been reaped
	waitErr error         // read only after exited is closed
}

// startChild runs this program's binary in role. ctx ending kills the
// child.
func startChild(ctx context.Context, exe, role string, log *logrus.Entry) (*child, error) {
	cmd, stdin, stdout, err := childproc.Start(ctx, exe, "-role", role)
	if err != nil {
		return nil, err
	}
	c := &child{
		name:    role,
		log:     log.WithFields(logrus.Fields{"child": role, "pid": cmd.Process.Pid}),
		cmd:     cmd,
		enc:     json.NewEncoder(stdin),
		pid:     cmd.Process.Pid,
		replies: make(chan msg, 4),
		exited:  make(chan struct{}),
	}
	c.log.Debug("child started")
	go c.read(stdout)
	return c, nil
}

// read delivers the child's messages until the end of its stdout, then
// reaps the child and closes exited.
func (c *child) read(stdout io.Reader) {
	defer close(c.exited)
	err := childproc.Decode(stdout, func(m msg) {
		select {
		case c.replies <- m:
		default:
			c.log.WithField("kind", m.Kind).Warn("dropped an unexpected message")
		}
	})
	if err != nil {
		c.log.WithField("err", err).Warn("bad output from child")
	}
	c.waitErr = c.cmd.Wait()
}

// await waits for the child's next message, which must be of kind want.
func (c *child) await(ctx context.Context, want string, timeout time.Duration) (msg, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case m := <-c.replies:
		switch m.Kind {
		case want:
			return m, nil
		case kindError:
			return m, fmt.Errorf("%s: %s", c.name, m.Err)
		}
		return m, fmt.Errorf("%s: got %q, want %q", c.name, m.Kind, want)
	case <-c.exited:
		return msg{}, fmt.Errorf("%s exited while the parent waited for %s: %v", c.name, want, c.waitErr)
	case <-t.C:
		return msg{}, fmt.Errorf("%s: no %s after %v", c.name, want, timeout)
	case <-ctx.Done():
		return msg{}, ctx.Err()
	}
}

// request sends a command and waits for its answer.
func (c *child) request(ctx context.Context, m msg, timeout time.Duration) (msg, error) {
	if err := c.enc.Encode(m); err != nil {
		return msg{}, fmt.Errorf("%s: send %s: %w", c.name, m.Kind, err)
	}
	return c.await(ctx, m.Kind, timeout)
}

// stop asks the child to exit, kills it if it has not after grace, and
// returns once it has been reaped. It may be called more than once.
func (c *child) stop(grace time.Duration) {
	select {
	case <-c.exited:
		return
	default:
	}
	_ = c.enc.Encode(msg{Kind: kindQuit})
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-c.exited:
		return
	case <-t.C:
	}
	c.log.WithField("grace", grace).Warn("child did not exit; killing it")
	if err := c.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		c.log.WithField("err", err).Warn("cannot kill child")
	}
	<-c.exited
}

// commands reads the parent's commands from stdin, one JSON line each, and
// hands each to handle, whose answer it writes to stdout. It returns nil on
// kindQuit or at the end of stdin (the parent is gone).
func commands(ctx context.Context, handle func(context.Context, msg) (msg, error)) error {
	dec := json.NewDecoder(os.Stdin)
	for {
		var m msg
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("read command: %w", err)
		}
		if m.Kind == kindQuit {
			return nil
		}
		reply, err := handle(ctx, m)
		if err != nil {
			reply = msg{Kind: kindError, Err: err.Error()}
		} else {
			reply.Kind = m.Kind
		}
		if err := tell(reply); err != nil {
			return err
		}
	}
}

// tell writes one message to the parent.
func tell(m msg) error {
	if err := json.NewEncoder(os.Stdout).Encode(m); err != nil {
		return fmt.Errorf("write to parent: %w", err)
	}
	return nil
}
