package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
)

// Children write one JSON envelope per line on stdout and read one command
// per line on stdin. Every command gets exactly one reply whose type is the
// command's name, so the parent, which sends one command at a time, can
// tell replies from the progress lines that come in between.
type envelope struct {
	Type string          `json:"type"`
	Data json.RawMessage `json:"data,omitempty"`
}

// Message types that are not replies.
const (
	msgReady    = "ready"    // the child is set up; readyMsg
	msgProgress = "progress" // once a second; serverProgress or clientsProgress
	msgUp       = "up"       // every client of a process has connected once; upMsg
	msgError    = "error"    // a command failed; its text
)

// Commands. The server takes stats, gc, profile-start, profile-stop,
// heap-profile, shutdown and quit; a client process takes rtt, record,
// events, profile-start, profile-stop and quit.
const (
	cmdStats        = "stats"         // serverStats
	cmdGC           = "gc"            // collect garbage, return it to the OS, then serverStats
	cmdRTT          = "rtt"           // rttReply; starts a new window
	cmdRecord       = "record"        // start recording dials and connects; recordReply
	cmdEvents       = "events"        // events <t0 in Unix ns>: eventsReply
	cmdProfileStart = "profile-start" // profile-start <file>
	cmdProfileStop  = "profile-stop"
	cmdHeapProfile  = "heap-profile" // heap-profile <file>
	cmdShutdown     = "shutdown"     // vgo Server.Shutdown, shutdownReply, then exit
	cmdQuit         = "quit"
)

type readyMsg struct {
	PID  int    `json:"pid"`
	Addr string `json:"addr,omitempty"` // the server's listening address
}

type serverProgress struct {
	Conns int    `json:"conns"`
	Pings uint64 `json:"pings"`
}

// serverStats are the server's counters and its Go runtime's memory
// figures, all from the server process.
type serverStats struct {
	Conns        int    `json:"conns"`
	Opened       uint64 `json:"opened"`
	Closed       uint64 `json:"closed"`
	Stale        uint64 `json:"stale"`
	Pings        uint64 `json:"pings"`
	HeapAlloc    uint64 `json:"heap_alloc"`
	HeapInuse    uint64 `json:"heap_inuse"`
	HeapSys      uint64 `json:"heap_sys"`
	HeapReleased uint64 `json:"heap_released"`
	StackInuse   uint64 `json:"stack_inuse"`
	Sys          uint64 `json:"sys"`
	Goroutines   int    `json:"goroutines"`
	NumGC        uint32 `json:"num_gc"`
	// Failed accepts, counted by the server's listener; closing the
	// listener counts as one.
	AcceptErrors  uint64 `json:"accept_errors"`
	LastAcceptErr string `json:"last_accept_err,omitempty"`
	// From vgo.ServerStats.
	Accepted  uint64 `json:"accepted"`  // connections accepted, refused ones included
	Refused   uint64 `json:"refused"`   // refused at the connection limit
	Throttled uint64 `json:"throttled"` // refused with a retry hint
}

// shutdownReply is how the server's graceful stop went, from the server
// process, just before it exits.
type shutdownReply struct {
	Conns int    `json:"conns"` // open connections when Shutdown began
	Took  int64  `json:"took"`  // nanoseconds Shutdown took
	Err   string `json:"err,omitempty"`
	// CPU is the process's CPU time, user plus system, when Shutdown
	// returned, in nanoseconds.
	CPU int64 `json:"cpu"`
}

type clientsProgress struct {
	// Epoch is the number of the latest record command, which Back and
	// Settled count since.
	Epoch       int64  `json:"epoch"`
	Connected   int64  `json:"connected"`   // clients connected now
	Ever        int64  `json:"ever"`        // clients that have connected at least once
	Back        int64  `json:"back"`        // clients that connected since record
	Dials       int64  `json:"dials"`       // calls of the dial function
	DialErrors  int64  `json:"dial_errors"` // dials that failed
	Disconnects int64  `json:"disconnects"` // lost connections
	Pongs       int64  `json:"pongs"`
	LastDialErr string `json:"last_dial_err,omitempty"`
	// Attempts whose TCP connect succeeded but whose hello did not, other
	// than those a busy server refused with a retry hint.
	HandshakeFails   int64  `json:"handshake_fails"`
	LastHandshakeErr string `json:"last_handshake_err,omitempty"`
	// Hellos cut short by the handshake timeout.
	HandshakeTimeouts int64 `json:"handshake_timeouts"`
	// Settled counts the clients back since record that have had a pong
	// since: their connection is healthy, and their backoff starts afresh.
	Settled int64 `json:"settled"`
	// TCP connects timed by the dial function: how many, how many took
	// slowConnect or more, and the longest, in nanoseconds.
	Connects     int64 `json:"connects"`
	SlowConnects int64 `json:"slow_connects"`
	MaxConnect   int64 `json:"max_connect"`
}

// upMsg times a client process's connect phase, in Unix nanoseconds: from
// its first Start to the first connect of its last client.
type upMsg struct {
	Start int64 `json:"start"`
	Up    int64 `json:"up"`
}

type rttReply struct {
	Window rttSnapshot `json:"window"` // since the previous rtt command
	Total  rttSnapshot `json:"total"`  // since the process started
}

type recordReply struct {
	Epoch int64 `json:"epoch"` // the recording's number, as progress will carry it
}

// eventsReply lists what the clients did since record, in nanoseconds
// relative to the t0 of the events command.
type eventsReply struct {
	Dials      []int64 `json:"dials"`       // each call of the dial function
	Scheduled  []int64 `json:"scheduled"`   // each WithOnReconnect: its time plus its delay
	Back       []int64 `json:"back"`        // each client's first connect
	Missing    int     `json:"missing"`     // clients not back yet
	Causes     []cause `json:"causes"`      // disconnect causes since record
	DialErrors int64   `json:"dial_errors"` // failed dials since record

	// Counted since record, like those above.
	RetryHints        uint64 `json:"retry_hints"`        // sum of vgo.ClientStats.RetryHints
	HandshakeTimeouts int64  `json:"handshake_timeouts"` // hellos cut short by the handshake timeout
	Connects          int64  `json:"connects"`           // TCP connects timed
	SlowConnects      int64  `json:"slow_connects"`      // of which took slowConnect or more
	MaxConnect        int64  `json:"max_connect"`        // the longest, in nanoseconds
}

type cause struct {
	Err   string `json:"err"`
	Count int    `json:"count"`
}

// output writes envelopes to stdout; progress and replies come from
// different goroutines.
type output struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func newOutput(w io.Writer) *output { return &output{enc: json.NewEncoder(w)} }

func (o *output) send(typ string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.enc.Encode(envelope{Type: typ, Data: data})
}

// commands reads the parent's commands from stdin. The channel closes at
// end of input, that is when the parent is gone. stop ends the reader even
// while it waits: stdin is switched to non-blocking mode so that the
// runtime's poller, not a blocked thread, waits on it, and closing it wakes
// the reader.
type commands struct {
	C    <-chan string
	f    *os.File
	done chan struct{}
	wg   sync.WaitGroup
}

func readCommands() *commands {
	f := os.Stdin
	if err := syscall.SetNonblock(syscall.Stdin, true); err == nil {
		f = os.NewFile(uintptr(syscall.Stdin), "stdin")
	}
	ch := make(chan string)
	c := &commands{C: ch, f: f, done: make(chan struct{})}
	c.wg.Go(func() {
		defer close(ch)
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			select {
			case ch <- strings.TrimSpace(sc.Text()):
			case <-c.done:
				return
			}
		}
	})
	return c
}

func (c *commands) stop() {
	close(c.done)
	c.f.Close()
	c.wg.Wait()
}

// errQuit is returned by a command handler that has answered its command
// and wants the process to stop, as after quit.
var errQuit = errors.New("quit")

// serveCommands answers the parent's commands until it says quit, goes
// away, or ctx ends, and then returns nil. It returns the first error that
// arrives on failed (nil for none) or that answering a command gives.
// handle answers the role's own commands and reports false for a name it
// does not know, and returns errQuit to stop as quit does; profiling and
// quit are the same for every role.
func serveCommands(ctx context.Context, log logrus.FieldLogger, cmds *commands, out *output,
	failed <-chan error, handle func(name, arg string) (bool, error)) error {
	var prof profiler
	defer prof.stop()
	for {
		select {
		case <-ctx.Done():
			// A signal or the deadline: the parent gets the same and
			// reports it.
			log.WithField("cause", context.Cause(ctx)).Info("stopping")
			return nil
		case err := <-failed:
			return err
		case line, ok := <-cmds.C:
			if !ok {
				log.Info("parent gone; stopping")
				return nil
			}
			name, arg := splitCommand(line)
			var err error
			switch name {
			case cmdProfileStart:
				err = reply(out, name, prof.start(arg))
			case cmdProfileStop:
				err = reply(out, name, prof.stop())
			case cmdQuit:
				log.Info("stopping")
				return nil
			default:
				var known bool
				if known, err = handle(name, arg); !known {
					err = out.send(msgError, fmt.Sprintf("unknown command %q", line))
				}
			}
			if errors.Is(err, errQuit) {
				log.Info("stopping")
				return nil
			}
			if err != nil {
				return err
			}
		}
	}
}

// reply answers a command that returns nothing but its outcome.
func reply(out *output, name string, err error) error {
	if err != nil {
		return out.send(msgError, fmt.Sprintf("%s: %v", name, err))
	}
	return out.send(name, struct{}{})
}

// splitCommand returns a command's name and its argument.
func splitCommand(line string) (string, string) {
	name, arg, _ := strings.Cut(line, " ")
	return name, strings.TrimSpace(arg)
}

// tick calls fn every period until ctx ends.
func tick(ctx context.Context, period time.Duration, fn func()) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			fn()
		case <-ctx.Done():
			return
		}
	}
}

// profiler writes a CPU profile between two commands.
type profiler struct {
	f *os.File
}

func (p *profiler) start(path string) error {
	if p.f != nil {
		return errors.New("a profile is already being written")
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return err
	}
	p.f = f
	return nil
}

// stop ends the profile, if one is being written.
func (p *profiler) stop() error {
	if p.f == nil {
		return nil
	}
	pprof.StopCPUProfile()
	err := p.f.Close()
	p.f = nil
	return err
}

// writeHeapProfile writes the live heap as of the last collection.
func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.WriteHeapProfile(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
