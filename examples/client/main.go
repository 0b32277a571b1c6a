// Command client connects to a vgo server and keeps the connection alive:
// it pings on an interval, logs each pong with its round-trip time, and when
// the server goes away it dials again with backoff until the server is back.
// It runs until SIGINT or SIGTERM.
//
// With -send N it instead sends N numbered messages to the example server,
// which echoes each one back, checks the echoes, and exits. Message i (from
// 1 to N) is 8 bytes: i as a big-endian uint64. The last line it prints,
// on standard output, is
//
//	sent N echoed E duplicates D reordered O lost L
//
// where sent counts the messages Send accepted, echoed the distinct numbers
// that came back, duplicates the echoes of a number already echoed,
// reordered the echoes of a new number lower than the highest one echoed
// before it, and lost is N minus echoed. A message whose Send fails while
// the client is disconnected is sent again, with the same number, once the
// client is connected, so sent reaches N. Once every number has been
// echoed the client exits, with status 0 if there were no duplicates and
// nothing was reordered, and 1 otherwise; when -deadline passes first it
// prints the same line and exits with status 1.
//
// Without -resume a message that is on its way when the connection drops
// is lost with it, and so is its echo. With -resume (and a server run with
// -resume) the client resumes its session after each reconnect and nothing
// is lost, repeated or reordered. Should the session be lost instead, for
// instance because the server restarted, the client logs how many messages
// were sent and never acknowledged, and which ones: the server may or may
// not have received them, and they are not sent again.
//
// Usage:
//
//	go run ./examples/client -addr 127.0.0.1:9966 -interval 1s -timeout 3s -backoff 250ms
//	go run ./examples/client -addr 127.0.0.1:9966 -resume -send 20000 -rate 5000 -deadline 30s
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vgonet/vgo"
)

// config is what the flags ask for.
type config struct {
	addr              string
	interval, timeout time.Duration
	backoff           time.Duration
	resume            bool
	send              int
	rate              float64
	deadline          time.Duration
}

func main() {
	var cfg config
	flag.StringVar(&cfg.addr, "addr", "127.0.0.1:9966", "server address, host:port")
	flag.DurationVar(&cfg.interval, "interval", time.Second, "how often to ping the server")
	flag.DurationVar(&cfg.timeout, "timeout", vgo.DefaultPongTimeout,
		"how long to wait for the server after a ping before dropping the connection")
	flag.DurationVar(&cfg.backoff, "backoff", 0,
		"first wait before dialing again after the connection is lost; later waits grow 1.4x per failed dial "+
			"to at most 5s (or this, if longer), each spread by ±50%; 0 means the library's 250ms")
	flag.BoolVar(&cfg.resume, "resume", false,
		"resume the session after each reconnect, so that no message is lost, repeated or reordered; "+
			"the server must run with -resume too")
	flag.IntVar(&cfg.send, "send", 0,
		"send `N` messages numbered 1 to N (8 bytes each, the number as a big-endian uint64) to the echo server, "+
			"check the echoes, print \"sent N echoed E duplicates D reordered O lost L\" and exit; "+
			"0 keeps pinging until interrupted")
	flag.Float64Var(&cfg.rate, "rate", 0,
		"with -send, send `R` messages per second; 0 sends as fast as the connection takes them")
	flag.DurationVar(&cfg.deadline, "deadline", time.Minute,
		"with -send, how long to wait for every echo before giving up with exit status 1")
	flag.Parse()

	log := logrus.New()
	log.SetFormatter(&logrus.TextFormatter{
		FullTimestamp:   true,
		TimestampFormat: "2006-01-02T15:04:05.000Z07:00",
	})
	var err error
	if cfg.send > 0 {
		var ok bool
		ok, err = runSend(cfg, log)
		if err == nil && !ok {
			os.Exit(1)
		}
	} else {
		err = run(cfg, log)
	}
	if err != nil {
		log.WithField("err", err).Error("client failed")
		os.Exit(1)
	}
}

// options returns the client options the flags ask for, with opts after
// them.
func options(cfg config, log *logrus.Logger, opts ...vgo.ClientOption) []vgo.ClientOption {
	base := []vgo.ClientOption{
		// vgo itself logs each connect and disconnect (with the cause) at
		// info level, a reconnect with the attempts and the time it took,
		// each failed dial at warn level with the attempt, the delay
		// before the next one and the error, and each resumed or lost
		// session. Pongs it logs only at debug level.
		vgo.WithLogger(log),
		vgo.WithPingInterval(cfg.interval),
		vgo.WithPongTimeout(cfg.timeout),
		vgo.WithBackoff(vgo.Backoff{BaseDelay: cfg.backoff}),
	}
	if cfg.resume {
		base = append(base, vgo.WithResume(0))
	}
	return append(base, opts...)
}

// run pings the server until SIGINT or SIGTERM, logging each pong.
func run(cfg config, log *logrus.Logger) error {
	c, err := vgo.NewClient(cfg.addr, options(cfg, log,
		vgo.WithOnPong(func(rtt time.Duration) {
			log.WithFields(logrus.Fields{"remote": cfg.addr, "rtt": rtt}).Info("pong")
		}),
	)...)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	c.Start()
	<-ctx.Done()
	log.Info("closing")
	return c.Close()
}

// runSend sends cfg.send numbered messages and checks their echoes. It
// prints the summary line and reports whether every message came back
// once and in order before the deadline.
func runSend(cfg config, log *logrus.Logger) (bool, error) {
	t := newTally(cfg.send)
	c, err := vgo.NewClient(cfg.addr, options(cfg, log,
		vgo.WithOnMessage(t.echo),
		vgo.WithOnSessionLost(func(unacked [][]byte) {
			e := log.WithField("count", len(unacked))
			if len(unacked) > 0 {
				e = e.WithFields(logrus.Fields{"first": number(unacked[0]), "last": number(unacked[len(unacked)-1])})
			}
			e.Warn("messages sent in the lost session and never acknowledged; they are not sent again")
		}),
	)...)
	if err != nil {
		return false, err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, cfg.deadline)
	defer cancel()
	c.Start()

	sendErr := make(chan error, 1)
	go func() { sendErr <- send(ctx, c, cfg, t) }()
	sending := sendErr
	for waiting := true; waiting; {
		select {
		case <-t.done:
			waiting = false
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				log.WithField("deadline", cfg.deadline).Warn("deadline passed before every echo came back")
			} else {
				log.Warn("interrupted before every echo came back")
			}
			waiting = false
		case <-c.Done():
			log.WithField("err", c.Err()).Error("the client stopped")
			waiting = false
		case err := <-sending:
			// Once every message is sent, only echoes are awaited.
			sending = nil
			if err != nil {
				log.WithField("err", err).Error("sending failed")
				waiting = false
			}
		}
	}
	cancel()
	if sending != nil {
		<-sending
	}
	c.Close()
	// After Close no echo can arrive: the counts are final, and the
	// summary is the last line, after the client's own logs.
	ok, summary, foreign := t.summary()
	if foreign > 0 {
		log.WithField("count", foreign).Warn("echoes that carry no number from 1 to N")
	}
	fmt.Println(summary)
	return ok, nil
}

// send sends the numbered messages at cfg.rate, retrying a message whose
// Send failed because the client was not connected once it is. It returns
// when every message is sent, or with the error that stopped it.
func send(ctx context.Context, c *vgo.Client, cfg config, t *tally) error {
	if err := c.WaitConnected(ctx); err != nil {
		return err
	}
	start := time.Now()
	msg := make([]byte, 8)
	for i := 1; i <= cfg.send; i++ {
		if cfg.rate > 0 {
			due := start.Add(time.Duration(float64(i-1) / cfg.rate * float64(time.Second)))
			if err := sleepUntil(ctx, due); err != nil {
				return err
			}
		}
		binary.BigEndian.PutUint64(msg, uint64(i))
		for {
			err := c.Send(ctx, msg)
			if err == nil {
				break
			}
			if !errors.Is(err, vgo.ErrNotConnected) {
				return err
			}
			if err := c.WaitConnected(ctx); err != nil {
				return err
			}
		}
		t.sent()
	}
	return nil
}

// sleepUntil waits until t, or returns ctx.Err() if ctx ends first.
func sleepUntil(ctx context.Context, t time.Time) error {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err()
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// number returns the number a message carries, or 0 if it is not 8 bytes
// long.
func number(msg []byte) uint64 {
	if len(msg) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(msg)
}

// tally counts the messages sent and their echoes. The echoes arrive on
// the client's reader while the summary is read from main, hence the
// lock.
type tally struct {
	mu         sync.Mutex
	n          int
	sentCount  int
	seen       []bool // seen[i] says number i has been echoed
	echoed     int
	dups       int
	reordered  int
	highest    uint64
	foreign    int           // echoes that carry no number from 1 to n
	done       chan struct{} // closed once every number has been echoed
	doneClosed bool
}

func newTally(n int) *tally {
	return &tally{n: n, seen: make([]bool, n+1), done: make(chan struct{})}
}

func (t *tally) sent() {
	t.mu.Lock()
	t.sentCount++
	t.mu.Unlock()
}

// echo counts one echo; it closes done once every number has come back.
func (t *tally) echo(msg []byte) {
	i := number(msg)
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case i < 1 || i > uint64(t.n):
		t.foreign++
	case t.seen[i]:
		t.dups++
	default:
		t.seen[i] = true
		t.echoed++
		if i < t.highest {
			t.reordered++
		}
		t.highest = max(t.highest, i)
	}
	if t.echoed == t.n && !t.doneClosed {
		t.doneClosed = true
		close(t.done)
	}
}

// summary returns whether every number came back once and in order, the
// summary line, and how many echoes carried no number from 1 to n.
func (t *tally) summary() (ok bool, line string, foreign int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	lost := t.n - t.echoed
	line = fmt.Sprintf("sent %d echoed %d duplicates %d reordered %d lost %d",
		t.sentCount, t.echoed, t.dups, t.reordered, lost)
	return lost == 0 && t.dups == 0 && t.reordered == 0, line, t.foreign
}
