// Command compare measures, process against process, what a vgo server costs
// next to a plain server that speaks the same wire protocol with one
// goroutine per connection, a bufio.Reader and a bufio.Writer, and nothing
// else: no send queue, no writer goroutine, no write timeout, no sessions.
//
// Both servers face the same client, plain Go code that speaks PROTOCOL.md
// itself (it is not vgo.Client), so that any difference comes from the
// servers. The server and the client always run in separate processes: the
// program starts them by running its own binary again with a hidden -role
// flag, talks to them with JSON lines over their stdin and stdout, and
// measures them from outside through /proc. CPU time is the sum over a
// process's threads of the time on CPU from /proc/<pid>/task/<tid>/schedstat,
// in nanoseconds (utime + stime from /proc/<pid>/stat, in 10 ms ticks,
// where schedstat cannot be read); memory is VmRSS from /proc/<pid>/status.
// The CPU figures include the time the kernel spends in the process's
// system calls. Every child raises its soft limit on open files to the hard
// limit.
//
// The machine's moments of noise are shared out fairly by interleaving: each
// run measures the vgo server, then the plain one, or the other way round on
// even runs, each time with fresh processes. The summary gives every run's
// figures, then for each figure its median over the runs with the range
// (lowest–highest), for each server and for the ratio vgo ÷ plain taken run
// by run. A ratio above 1 means vgo's figure is larger.
//
// # Scenarios
//
// echo: the client opens C connections (each value of -conns in turn),
// each with exactly one request in flight: it writes a data frame of -size
// bytes, flushes, reads the echo and checks it, and starts again at once.
// After a warm-up of -warmup (1 s) the program measures for -duration: the
// messages echoed per second, the round-trip time of each request (its
// median and 99th percentile over all requests), and the server's CPU time
// over the window divided by the messages echoed in it. The client's CPU per
// message and the server's share of one core are shown too.
//
// idle: the client opens -idle-conns connections, at most 200 dials in
// flight, and each pings every -interval with an 8-byte payload, its first
// ping at a random offset, uniform in [0, interval), so that the pings are
// spread over the interval as from a real fleet. Both servers close a
// connection silent for 15 s. Once every connection is up and one interval
// has passed, the program measures for -window: the server's CPU time
// divided by the pongs the client received in the window, the pongs per
// second, the pong round-trip time (median and 99th percentile), and the
// server's memory per connection: VmRSS with every connection open, less
// VmRSS before the first one, divided by their number; and, as the server's
// Go runtime sees it after two runtime.GC calls, HeapAlloc and StackInuse
// with every connection less the same before, each divided by the number of
// connections. The server's goroutines per connection are shown too.
//
// At the end of every run the server process exits before the client, so
// that the side that closes first, which keeps each connection in TIME_WAIT
// for a minute, is the server: the client's source ports stay free for the
// next run.
//
// The client's hello is the smallest of protocol version 1, the magic and
// the version; in the idle scenario it also carries the ping interval (tag
// 02), as the hello of any client that pings does. The plain server answers
// with a hello announcing the same heartbeat timeout and ping interval range
// as a vgo server with its defaults. It reads each frame in place from its
// 4 KiB read buffer when it fits, answers a data frame with the same data
// frame and a ping with a pong carrying the same payload, and flushes only
// when no more input is buffered, so that pipelined input shares one write.
// Before every read that may block it sets a read deadline 15 s ahead.
//
// The vgo server is vgo.NewServer with its defaults, a logger that prints
// warnings and errors only, and a handler that sends every message back
// with Conn.Send.
//
// # Usage
//
// From the root of the repository, with nothing else running on the
// machine:
//
//	go run ./examples/compare
//
// runs both scenarios with the defaults, 5 runs each; it takes about seven
// minutes. The echo scenario alone, 3 runs, and the idle one with ten
// thousand connections, one run:
//
//	go run ./examples/compare -scenario echo -runs 3
//	go run ./examples/compare -scenario idle -runs 1
//
// A quick check that everything works takes under a minute:
//
//	go run ./examples/compare -runs 1 -duration 2s -idle-conns 2000 -window 10s
//
// Events are logged to stderr, one line each; the summary, in Markdown, goes
// to stdout. The program exits with status 1 when a run fails or -deadline
// passes, after it has printed what it measured until then.
//
// Flags:
//
//	-scenario    echo, idle or all (default all)
//	-runs        runs of each case, each measuring both servers (default 5)
//	-conns       comma-separated connection counts for echo (default 1,100)
//	-size        payload bytes of each echo request (default 64)
//	-warmup      echo traffic before the window (default 1s)
//	-duration    echo measuring window (default 5s)
//	-idle-conns  connections for idle (default 10000)
//	-interval    ping interval of each idle connection (default 5s)
//	-window      idle measuring window (default 20s)
//	-deadline    limit for the whole program; when it passes, every child
//	             process is killed (default 30m)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vgonet/vgo/internal/childproc"
)

// Roles. The parent runs its own binary again with -role set for each child;
// the flag is left out of the usage text.
const (
	roleParent      = ""
	roleServerVGO   = "server-vgo"
	roleServerPlain = "server-plain"
	roleClient      = "client"
)

// Scenarios (-scenario).
const (
	scenarioEcho = "echo"
	scenarioIdle = "idle"
	scenarioAll  = "all"
)

// heartbeatTimeout is how long both servers let a connection stay silent:
// vgo's default, which the plain server copies.
const heartbeatTimeout = 15 * time.Second

// fdReserve is how many file descriptors a process needs besides its
// connections: standard streams, the listener, the runtime's poller.
const fdReserve = 64

// config holds the flags.
type config struct {
	scenario  string
	runs      int
	conns     []int
	size      int
	warmup    time.Duration
	duration  time.Duration
	idleConns int
	interval  time.Duration
	window    time.Duration
	deadline  time.Duration
	role      string

	args string // the command line as given, for the summary
}

func parseFlags() (config, error) {
	c := config{args: strings.Join(os.Args[1:], " ")}
	var conns string
	fs := flag.NewFlagSet(os.Args[0], flag.ContinueOnError)
	fs.StringVar(&c.scenario, "scenario", scenarioAll, "echo, idle or all")
	fs.IntVar(&c.runs, "runs", 5, "runs of each case, each measuring both servers")
	fs.StringVar(&conns, "conns", "1,100", "comma-separated connection counts for echo")
	fs.IntVar(&c.size, "size", 64, "payload bytes of each echo request")
	fs.DurationVar(&c.warmup, "warmup", time.Second, "echo traffic before the window")
	fs.DurationVar(&c.duration, "duration", 5*time.Second, "echo measuring window")
	fs.IntVar(&c.idleConns, "idle-conns", 10000, "connections for idle")
	fs.DurationVar(&c.interval, "interval", 5*time.Second, "ping interval of each idle connection")
	fs.DurationVar(&c.window, "window", 20*time.Second, "idle measuring window")
	fs.DurationVar(&c.deadline, "deadline", 30*time.Minute, "limit for the whole program; when it passes, every child is killed")
	fs.StringVar(&c.role, "role", roleParent, "process role")
	childproc.Usage(fs, "role")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	for s := range strings.SplitSeq(conns, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			return c, fmt.Errorf("-conns %q: want positive integers separated by commas", conns)
		}
		c.conns = append(c.conns, n)
	}
	return c, c.check()
}

// check rejects values the runs cannot work with.
func (c *config) check() error {
	limit := nofileHardLimit()
	switch {
	case c.scenario != scenarioEcho && c.scenario != scenarioIdle && c.scenario != scenarioAll:
		return fmt.Errorf("-scenario %q: want %s, %s or %s", c.scenario, scenarioEcho, scenarioIdle, scenarioAll)
	case c.runs < 1:
		return fmt.Errorf("-runs %d: need at least one", c.runs)
	case c.size < 0 || c.size > 1<<20:
		return fmt.Errorf("-size %d: want 0 to 1 MiB", c.size)
	case c.warmup < 0:
		return fmt.Errorf("-warmup %v: must not be negative", c.warmup)
	case c.duration <= 0 || c.window <= 0:
		return errors.New("-duration and -window must be positive")
	case c.idleConns < 1:
		return fmt.Errorf("-idle-conns %d: need at least one", c.idleConns)
	case c.interval <= 0 || c.interval >= heartbeatTimeout:
		return fmt.Errorf("-interval %v: must be positive and below the servers' heartbeat timeout %v", c.interval, heartbeatTimeout)
	case c.deadline <= 0:
		return fmt.Errorf("-deadline %v: must be positive", c.deadline)
	}
	for _, n := range append([]int{c.idleConns}, c.conns...) {
		if limit > 0 && uint64(n+fdReserve) > limit {
			return fmt.Errorf("%d connections: a process may open only %d files here", n, limit)
		}
	}
	return nil
}

func (c *config) echo() bool { return c.scenario == scenarioEcho || c.scenario == scenarioAll }
func (c *config) idle() bool { return c.scenario == scenarioIdle || c.scenario == scenarioAll }

func main() {
	cfg, err := parseFlags()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	log := newLogger()
	if err != nil {
		log.WithField("err", err).Error("bad flags")
		os.Exit(2)
	}
	role := cfg.role
	if role == roleParent {
		role = "parent"
	}
	entry := log.WithField("role", role)
	raiseNofile(entry)

	// SIGINT and SIGTERM end the program as its deadline does: the children
	// are killed and what was measured so far is printed.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(ctx, cfg.deadline)
	switch cfg.role {
	case roleParent:
		err = runParent(ctx, cfg, entry)
	case roleServerVGO, roleServerPlain:
		err = runServer(ctx, cfg.role, entry)
	case roleClient:
		err = runClient(ctx, entry)
	default:
		err = fmt.Errorf("unknown role %q", cfg.role)
	}
	cancel()
	stop()
	if err != nil {
		entry.WithField("err", err).Error("failed")
		os.Exit(1)
	}
}

func newLogger() *logrus.Logger {
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: "15:04:05.000"})
	return log
}

// nofileHardLimit returns the hard limit on open files, or 0 if unknown.
func nofileHardLimit() uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0
	}
	return rl.Max
}

// raiseNofile lifts the soft limit on open files to the hard one, which
// bounds how many connections a process can hold.
func raiseNofile(log *logrus.Entry) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		log.WithField("err", err).Warn("cannot read RLIMIT_NOFILE")
		return
	}
	if rl.Cur == rl.Max {
		return
	}
	before := rl.Cur
	rl.Cur = rl.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		log.WithFields(logrus.Fields{"soft": before, "hard": rl.Max, "err": err}).Warn("cannot raise RLIMIT_NOFILE")
		return
	}
	log.WithFields(logrus.Fields{"before": before, "soft": rl.Cur}).Debug("raised RLIMIT_NOFILE")
}
