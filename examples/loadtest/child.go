package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vgonet/vgo/internal/childproc"
)

// child is the parent's handle on one child process: commands go to its
// stdin, and one goroutine per child decodes its stdout until the child
// exits, then reaps it.
type child struct {
	name  string
	log   *logrus.Entry
	cmd   *exec.Cmd
	stdin io.WriteCloser
	pid   int

	replies chan envelope // everything that is not progress: ready, replies, errors
	exited  chan struct{} // closed once the child has been reaped
	waitErr error         // read only after exited is closed
	wg      sync.WaitGroup
}

// startChild runs this program's binary with args. onEvent receives the
// child's progress and up messages on the child's reader goroutine, so it
// must not block. ctx ending kills the child.
func startChild(ctx context.Context, exe, name string, args []string, log *logrus.Entry, onEvent func(envelope)) (*child, error) {
	cmd, stdin, stdout, err := childproc.Start(ctx, exe, args...)
	if err != nil {
		return nil, err
	}
	c := &child{
		name:    name,
		log:     log.WithFields(logrus.Fields{"child": name, "pid": cmd.Process.Pid}),
		cmd:     cmd,
		stdin:   stdin,
		pid:     cmd.Process.Pid,
		replies: make(chan envelope, 4),
		exited:  make(chan struct{}),
	}
	c.log.WithField("args", strings.Join(args, " ")).Info("child started")
	c.wg.Go(func() {
		defer close(c.exited)
		err := childproc.Decode(stdout, func(env envelope) {
			switch env.Type {
			case msgProgress, msgUp:
				onEvent(env)
			default:
				select {
				case c.replies <- env:
				default:
					// Only a reply that came after its request timed out
					// can find the buffer full.
					c.log.WithField("type", env.Type).Warn("dropped a late reply")
				}
			}
		})
		if err != nil {
			c.log.WithField("err", err).Warn("bad output from child")
		}
		c.waitErr = cmd.Wait()
	})
	return c, nil
}

// await waits for the child's next message that is not progress, which must
// be of type want, and decodes its data into v (if v is not nil).
func (c *child) await(ctx context.Context, want string, timeout time.Duration, v any) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case env := <-c.replies:
		if env.Type == msgError {
			var text string
			_ = json.Unmarshal(env.Data, &text)
			return fmt.Errorf("%s: %s", c.name, text)
		}
		if env.Type != want {
			return fmt.Errorf("%s: got %q, want %q", c.name, env.Type, want)
		}
		if v == nil {
			return nil
		}
		if err := json.Unmarshal(env.Data, v); err != nil {
			return fmt.Errorf("%s: %s: %w", c.name, want, err)
		}
		return nil
	case <-c.exited:
		return fmt.Errorf("%s exited while waiting for %s: %v", c.name, want, c.waitErr)
	case <-t.C:
		return fmt.Errorf("%s: no %s after %v", c.name, want, timeout)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// request sends a command and waits for its reply.
func (c *child) request(ctx context.Context, command string, timeout time.Duration, v any) error {
	if _, err := io.WriteString(c.stdin, command+"\n"); err != nil {
		return fmt.Errorf("%s: send %q: %w", c.name, command, err)
	}
	name, _ := splitCommand(command)
	return c.await(ctx, name, timeout, v)
}

// kill ends the child at once and waits until it is reaped.
func (c *child) kill() {
	if err := c.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		c.log.WithField("err", err).Warn("cannot kill child")
	}
	c.wg.Wait()
}

// waitExit waits until the child has exited and been reaped, and kills it
// if that takes longer than limit. It reports whether the child exited by
// itself.
func (c *child) waitExit(limit time.Duration) bool {
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-c.exited:
		c.wg.Wait()
		return true
	case <-t.C:
		c.log.WithField("limit", limit).Warn("child did not exit; killing it")
		c.kill()
		return false
	}
}

// stop asks the child to quit, and kills it if it has not exited after
// grace.
func (c *child) stop(grace time.Duration) {
	select {
	case <-c.exited:
		c.wg.Wait()
		return
	default:
	}
	_, _ = io.WriteString(c.stdin, cmdQuit+"\n")
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-c.exited:
	case <-t.C:
		c.log.WithField("grace", grace).Warn("child did not quit; killing it")
		c.kill()
	}
	c.wg.Wait()
}

// isRunning reports whether the child has not exited yet.
func (c *child) isRunning() bool {
	select {
	case <-c.exited:
		return false
	default:
		return true
	}
}
