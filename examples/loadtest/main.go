// Command loadtest holds many concurrent vgo connections against a vgo
// server on loopback and measures what they cost: how fast they connect,
// the server's memory per idle connection, the CPU that heartbeats take
// while nothing else happens, the pong round-trip times, and how the
// clients come back after the server is killed, or shut down gracefully,
// and restarted.
//
// One process cannot hold both ends of many connections: the hard limit on
// file descriptors is per process, and every connection needs one on each
// side. So the program runs as several processes of the same binary: the
// parent starts a server process and -procs client processes, tells them
// what to do, measures them through /proc, and prints a summary. Children
// write JSON lines on stdout and read commands on stdin; all of them log to
// stderr. Every process raises its soft RLIMIT_NOFILE to the hard limit.
//
// A client process dials from several loopback source addresses
// (127.0.0.2, 127.0.0.3, ...; -sources), because a source address has only
// the ephemeral port range (about 28,000 ports) to dial from. Binding a
// source address normally makes bind() pick the port as well, searching
// for one that no socket on the address holds, sockets in TIME_WAIT
// included; with ten thousand ports taken, that search costs the client
// processes seconds of kernel time and can slow connects tenfold.
// -bind-no-port (on by default) leaves the choice to connect(). For the
// same reason the run ends by stopping the server first: the side that
// closes first keeps each connection in TIME_WAIT for a minute, and on the
// clients' side that would hold source ports the next run needs.
//
// Progress and events are logged to stderr, at most one progress line a
// second; the summary goes to stdout. It names the process every figure
// comes from and checks the project's targets: server memory per idle
// connection, heartbeat CPU, and how fast the clients come back after a
// restart without straining the new server (no handshake timeouts, no
// dropped SYNs).
//
// Phases, in order:
//
//  1. start the server on -addr and measure its resident memory without
//     connections;
//  2. start the client processes, each with its share of -n clients, at most
//     -ramp dials in flight per process, and wait until every client is
//     connected (connect rate);
//  3. wait -settle, then measure for -idle: CPU of the server and of the
//     client processes, pong round-trip times, and the server's memory;
//  4. with -restart: stop the server (-restart-mode: SIGKILL, or a graceful
//     vgo Server.Shutdown that asks the clients to spread their return
//     over the drain window, after which the process exits), start a new
//     one on the same address -downtime after the old one is gone, and time
//     the clients' return, counting every dial they make. Time zero is the
//     moment the stop begins. Besides the return times the phase records
//     the new server's refusals (vgo.ServerStats.Throttled and Refused),
//     the clients' retry hints (vgo.ClientStats.RetryHints), hellos that
//     hit the handshake timeout, TCP connects that took 900 ms or more (on
//     loopback, a SYN that was dropped and retransmitted after a second),
//     the machine's TcpExt ListenOverflows and ListenDrops, and the new
//     server's peak resident memory (VmHWM) and CPU, with its busiest
//     second. With -repeat the phase runs several times in a row, each
//     run starting once every client is back and has had a pong, so that
//     its backoff starts afresh; the summary gives each run's return time
//     after the new server listened, their median and their maximum;
//  5. stop everything and print the summary.
//
// Each phase has its own time limit, and -deadline bounds the whole run:
// when it passes, every child process is killed.
//
// Usage:
//
//	go run ./examples/loadtest [flags]
//
// Flags:
//
//	-n               connections to hold (default 1000)
//	-procs           client processes (default ceil(n/5000))
//	-sources         loopback source addresses for the clients, from
//	                 127.0.0.2 up (default ceil(n/10000))
//	-addr            server address; port 0 picks a free port, which the
//	                 clients and the restarted server reuse (default
//	                 127.0.0.1:0)
//	-interval        client ping interval (default 5s)
//	-timeout         client pong timeout (default 3s, the library's)
//	-server-timeout  server heartbeat timeout (default 3 x interval)
//	-backoff-base    first reconnect delay (default 0: the library's,
//	                 see vgo.Backoff)
//	-backoff-max     largest reconnect delay, jitter included (default 0:
//	                 the library's)
//	-backoff-mult    growth of the delay per failed attempt, at least 1
//	                 (default 0: the library's)
//	-jitter          fraction, up to 1, by which each delay is randomly
//	                 shortened or lengthened (default 0: the library's;
//	                 negative: none)
//	-ramp            dials in flight per client process while connecting
//	                 (default 200; 0 means all at once)
//	-bind-no-port    set IP_BIND_ADDRESS_NO_PORT on the clients' sockets, so
//	                 that connect() picks the source port (default true)
//	-settle          wait between the last connect and the idle window
//	                 (default 2 x interval)
//	-idle            idle measuring window (default 20s; 0 skips it)
//	-restart         run the restart phase (default true)
//	-restart-mode    how the server is stopped: kill (SIGKILL) or shutdown
//	                 (vgo Server.Shutdown, then the process exits)
//	                 (default kill)
//	-drain           the server's drain window, sent to the clients by
//	                 Shutdown (default 0: the library's,
//	                 vgo.DefaultDrainWindow; negative: none)
//	-max-handshakes  the server's bound on connections in their handshake,
//	                 beyond which it answers with a retry hint (default 0:
//	                 the library's, vgo.DefaultMaxHandshakes; negative: none)
//	-retry-after     the server's retry hint, drawn between half and one and
//	                 a half times this (default 0: the library's,
//	                 vgo.DefaultRetryAfter)
//	-downtime        how long the server stays down, from the old process's
//	                 exit to the new one's start (default 1s)
//	-repeat          restart phases in a row (default 1)
//	-connect-timeout limit for all clients to connect (default 2m)
//	-restart-timeout limit for all clients to come back in each restart,
//	                 counted from the new server listening (default 0:
//	                 the larger of 60s and 2 x backoff-max + 30s, plus the
//	                 drain window in shutdown mode)
//	-deadline        limit for the whole run (default 10m)
//	-profile         directory for CPU profiles of the server and client
//	                 processes over the idle window and a heap profile of
//	                 the server with every connection open (default none;
//	                 profiling adds a little CPU to the figures)
//	-lib-log         level of the library's own log lines (default error:
//	                 at info, every connect of every client is logged)
//
// Examples:
//
//	go run ./examples/loadtest -n 1000 -interval 1s
//	go run ./examples/loadtest -n 10000 -interval 5s
//	go run ./examples/loadtest -n 19000 -interval 5s
//	go run ./examples/loadtest -n 1 -idle 0 -downtime 3s -repeat 5
//	go run ./examples/loadtest -n 200 -idle 0 -restart-mode shutdown -downtime 2s
//	go run ./examples/loadtest -n 10000 -idle 0 -backoff-base 2s -jitter 1 -backoff-max 10s
//	go run ./examples/loadtest -n 19000 -restart=false -profile /tmp/vgo-prof
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vgonet/vgo"

	"github.com/vgonet/vgo/internal/childproc"
)

// Roles. The parent re-executes its own binary with -role set for the
// children; the flag is hidden from the usage text.
const (
	roleParent  = ""
	roleServer  = "server"
	roleClients = "clients"
)

// Ways to stop the server in the restart phase (-restart-mode).
const (
	modeKill     = "kill"
	modeShutdown = "shutdown"
)

// minRestartTimeout is the least the default -restart-timeout allows for
// every client to come back.
const minRestartTimeout = 60 * time.Second

// config holds every flag; the parent passes children the ones they need.
type config struct {
	n              int
	procs          int
	sources        int
	addr           string
	interval       time.Duration
	timeout        time.Duration
	serverTimeout  time.Duration
	backoffBase    time.Duration // 0: the library's default, as for the three below
	backoffMax     time.Duration
	backoffMult    float64
	jitter         float64 // negative: none
	ramp           int
	bindNoPort     bool
	settle         time.Duration
	idle           time.Duration
	restart        bool
	restartMode    string
	drain          time.Duration // 0: the library's default; negative: none
	maxHandshakes  int           // 0: the library's default; negative: no bound
	retryAfter     time.Duration // 0: the library's default
	downtime       time.Duration
	repeat         int
	connectTimeout time.Duration
	restartTimeout time.Duration
	deadline       time.Duration
	profile        string
	libLog         string

	// Set by the parent for its children only.
	role  string
	proc  int // index of a client process
	count int // clients in this process
	first int // global index of this process's first client
}

// hiddenFlags are the flags only the parent sets, left out of -help.
var hiddenFlags = []string{"role", "proc", "count", "first"}

func parseFlags() (config, error) {
	var c config
	fs := flag.NewFlagSet(os.Args[0], flag.ContinueOnError)
	fs.IntVar(&c.n, "n", 1000, "connections to hold")
	fs.IntVar(&c.procs, "procs", 0, "client processes (0: ceil(n/5000))")
	fs.IntVar(&c.sources, "sources", 0, "loopback source addresses for the clients, from 127.0.0.2 up (0: ceil(n/10000))")
	fs.StringVar(&c.addr, "addr", "127.0.0.1:0", "server address; port 0 picks a free port")
	fs.DurationVar(&c.interval, "interval", 5*time.Second, "client ping interval")
	fs.DurationVar(&c.timeout, "timeout", vgo.DefaultPongTimeout, "client pong timeout")
	fs.DurationVar(&c.serverTimeout, "server-timeout", 0, "server heartbeat timeout (0: 3 x interval)")
	fs.DurationVar(&c.backoffBase, "backoff-base", 0, "first reconnect delay (0: the library's default, see vgo.Backoff)")
	fs.DurationVar(&c.backoffMax, "backoff-max", 0, "largest reconnect delay, jitter included (0: the library's default)")
	fs.Float64Var(&c.backoffMult, "backoff-mult", 0, "growth of the reconnect delay per failed attempt, at least 1 (0: the library's default)")
	fs.Float64Var(&c.jitter, "jitter", 0, "fraction, up to 1, by which each reconnect delay is randomly spread (0: the library's default; negative: none)")
	fs.IntVar(&c.ramp, "ramp", 200, "dials in flight per client process while connecting (0: all at once)")
	fs.BoolVar(&c.bindNoPort, "bind-no-port", true, "let connect(), not bind(), choose the clients' source ports (IP_BIND_ADDRESS_NO_PORT)")
	fs.DurationVar(&c.settle, "settle", 0, "wait between the last connect and the idle window (0: 2 x interval)")
	fs.DurationVar(&c.idle, "idle", 20*time.Second, "idle measuring window (0: skip)")
	fs.BoolVar(&c.restart, "restart", true, "stop and restart the server and time the clients' return")
	fs.StringVar(&c.restartMode, "restart-mode", modeKill, "how the restart phase stops the server: kill (SIGKILL) or shutdown (vgo Server.Shutdown, then exit)")
	fs.IntVar(&c.maxHandshakes, "max-handshakes", 0, "the server's bound on connections in their handshake, beyond which it answers with a retry hint (0: the library's default, vgo.DefaultMaxHandshakes; negative: no bound)")
	fs.DurationVar(&c.retryAfter, "retry-after", 0, "the server's retry hint, drawn between half and one and a half times this (0: the library's default, vgo.DefaultRetryAfter)")
	fs.DurationVar(&c.drain, "drain", 0, "the server's drain window, sent to the clients by Shutdown (0: the library's default, vgo.DefaultDrainWindow; negative: none)")
	fs.DurationVar(&c.downtime, "downtime", time.Second, "how long the server stays down in the restart phase, from the old process's exit")
	fs.IntVar(&c.repeat, "repeat", 1, "restart phases in a row")
	fs.DurationVar(&c.connectTimeout, "connect-timeout", 2*time.Minute, "limit for all clients to connect")
	fs.DurationVar(&c.restartTimeout, "restart-timeout", 0, "limit for all clients to come back in each restart, from the new server listening (0: the larger of 60s and 2 x backoff-max + 30s, plus the drain window in shutdown mode)")
	fs.DurationVar(&c.deadline, "deadline", 10*time.Minute, "limit for the whole run")
	fs.StringVar(&c.profile, "profile", "", "directory for CPU profiles over the idle window and a heap profile of the server")
	fs.StringVar(&c.libLog, "lib-log", "error", "level of the library's own log lines")
	fs.StringVar(&c.role, "role", roleParent, "process role")
	fs.IntVar(&c.proc, "proc", 0, "client process index")
	fs.IntVar(&c.count, "count", 0, "clients in this process")
	fs.IntVar(&c.first, "first", 0, "global index of the first client")
	childproc.Usage(fs, hiddenFlags...)
	if err := fs.Parse(os.Args[1:]); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	return c, c.resolve()
}

// resolve fills in the defaults that depend on other flags and rejects
// values the run cannot work with.
func (c *config) resolve() error {
	if c.n < 1 {
		return fmt.Errorf("-n %d: need at least one connection", c.n)
	}
	if c.procs == 0 {
		c.procs = (c.n + 4999) / 5000
	}
	if c.sources == 0 {
		c.sources = (c.n + 9999) / 10000
	}
	if c.serverTimeout == 0 {
		c.serverTimeout = 3 * c.interval
	}
	if c.settle == 0 {
		c.settle = 2 * c.interval
	}
	if c.restartTimeout == 0 {
		c.restartTimeout = max(minRestartTimeout, 2*c.backoffMax+30*time.Second)
		if c.restartMode == modeShutdown {
			c.restartTimeout += c.drainWindow()
		}
	}
	switch {
	case c.procs < 1 || c.procs > c.n:
		return fmt.Errorf("-procs %d: need 1 to n client processes", c.procs)
	case c.sources < 1 || c.sources > 250:
		return fmt.Errorf("-sources %d: need 1 to 250 source addresses", c.sources)
	case c.interval <= 0:
		return fmt.Errorf("-interval %v: heartbeats must be on", c.interval)
	case c.timeout <= 0:
		return fmt.Errorf("-timeout %v: must be positive", c.timeout)
	case c.serverTimeout <= c.interval:
		return fmt.Errorf("-server-timeout %v: must exceed the ping interval %v", c.serverTimeout, c.interval)
	case c.backoffBase < 0 || c.backoffMax < 0:
		return fmt.Errorf("-backoff-base %v, -backoff-max %v: must not be negative", c.backoffBase, c.backoffMax)
	case c.backoffBase > 0 && c.backoffMax > 0 && c.backoffMax < c.backoffBase:
		return fmt.Errorf("-backoff-base %v, -backoff-max %v: need base <= max", c.backoffBase, c.backoffMax)
	case c.backoffMult != 0 && (c.backoffMult < 1 || math.IsNaN(c.backoffMult) || math.IsInf(c.backoffMult, 0)):
		return fmt.Errorf("-backoff-mult %v: must be at least 1, or 0 for the library's default", c.backoffMult)
	case c.jitter > 1 || math.IsNaN(c.jitter):
		return fmt.Errorf("-jitter %v: must be at most 1", c.jitter)
	case c.ramp < 0:
		return fmt.Errorf("-ramp %d: must not be negative", c.ramp)
	case c.idle < 0 || c.downtime < 0:
		return errors.New("-idle and -downtime must not be negative")
	case c.restartMode != modeKill && c.restartMode != modeShutdown:
		return fmt.Errorf("-restart-mode %q: want %s or %s", c.restartMode, modeKill, modeShutdown)
	case c.repeat < 1:
		return fmt.Errorf("-repeat %d: need at least one run", c.repeat)
	}
	if _, err := logrus.ParseLevel(c.libLog); err != nil {
		return fmt.Errorf("-lib-log: %w", err)
	}
	return nil
}

// backoff is the clients' backoff as the flags give it; zero fields take
// the library's defaults.
func (c *config) backoff() vgo.Backoff {
	return vgo.Backoff{
		BaseDelay:  c.backoffBase,
		Multiplier: c.backoffMult,
		Jitter:     c.jitter,
		MaxDelay:   c.backoffMax,
	}
}

// drainWindow is the drain window the server sends with Shutdown, the
// library's default for 0, or 0 for none.
func (c *config) drainWindow() time.Duration {
	switch {
	case c.drain == 0:
		return vgo.DefaultDrainWindow
	case c.drain < 0:
		return 0
	}
	return c.drain
}

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
	entry := log.WithField("role", roleName(cfg))
	raiseNofile(entry)

	// SIGINT and SIGTERM end the run like its deadline does: children are
	// stopped and whatever was measured so far is printed.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, cfg.deadline)
	defer cancel()

	switch cfg.role {
	case roleParent:
		err = runParent(ctx, cfg, entry)
	case roleServer:
		err = runServer(ctx, cfg, entry)
	case roleClients:
		err = runClients(ctx, cfg, entry)
	default:
		err = fmt.Errorf("unknown role %q", cfg.role)
	}
	if err != nil {
		entry.WithField("err", err).Error("failed")
		stop()
		cancel()
		os.Exit(1)
	}
}

func newLogger() *logrus.Logger {
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetFormatter(&logrus.TextFormatter{
		FullTimestamp:   true,
		TimestampFormat: "15:04:05.000",
	})
	return log
}

// libLogger is the logger handed to vgo. The library logs every connect and
// disconnect at info level, which for thousands of connections would bury
// the program's own lines.
func libLogger(cfg config, log *logrus.Entry) *logrus.Entry {
	l := logrus.New()
	l.SetOutput(log.Logger.Out)
	l.SetFormatter(log.Logger.Formatter)
	level, _ := logrus.ParseLevel(cfg.libLog) // checked by resolve
	l.SetLevel(level)
	return l.WithFields(log.Data).WithField("lib", "vgo")
}

func roleName(cfg config) string {
	switch cfg.role {
	case roleParent:
		return "parent"
	case roleClients:
		return fmt.Sprintf("clients-%d", cfg.proc)
	}
	return cfg.role
}

// raiseNofile lifts the soft limit on open files to the hard one, which
// bounds how many connections this process can hold.
func raiseNofile(log *logrus.Entry) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		log.WithField("err", err).Warn("cannot read RLIMIT_NOFILE")
		return
	}
	before := rl.Cur
	rl.Cur = rl.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		log.WithFields(logrus.Fields{"soft": before, "hard": rl.Max, "err": err}).Warn("cannot raise RLIMIT_NOFILE")
		return
	}
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		log.WithField("err", err).Warn("cannot read RLIMIT_NOFILE")
		return
	}
	log.WithFields(logrus.Fields{"before": before, "soft": rl.Cur, "hard": rl.Max}).Info("raised RLIMIT_NOFILE")
}
