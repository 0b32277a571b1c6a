// Command client connects to a vgo server and keeps the connection alive:
// it pings on an interval, logs each pong with its round-trip time, and when
// the server goes away it dials again with backoff until the server is back.
// It runs until SIGINT or SIGTERM.
//
// Usage:
//
//	go run ./examples/client -addr 127.0.0.1:9966 -interval 1s -timeout 3s -backoff 250ms
package main

import (
	"context"
	"flag"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vgonet/vgo"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9966", "server address, host:port")
	interval := flag.Duration("interval", time.Second, "how often to ping the server")
	timeout := flag.Duration("timeout", vgo.DefaultPongTimeout,
		"how long to wait for the server after a ping before dropping the connection")
	backoff := flag.Duration("backoff", 0,
		"first wait before dialing again after the connection is lost; later waits grow 1.4x per failed dial "+
			"to at most 5s (or this, if longer), each spread by ±50%; 0 means the library's 250ms")
	flag.Parse()

	log := logrus.New()
	log.SetFormatter(&logrus.TextFormatter{
		FullTimestamp:   true,
		TimestampFormat: "2006-01-02T15:04:05.000Z07:00",
	})
	if err := run(*addr, *interval, *timeout, *backoff, log); err != nil {
		log.WithField("err", err).Error("client failed")
		os.Exit(1)
	}
}

func run(addr string, interval, timeout, backoff time.Duration, log *logrus.Logger) error {
	c, err := vgo.NewClient(addr,
		// vgo itself logs each connect and disconnect (with the cause) at
		// info level, a reconnect with the attempts and the time it took,
		// and each failed dial at warn level with the attempt, the delay
		// before the next one and the error. Pongs it logs only
		// at debug level, so they are the one event logged here.
		vgo.WithLogger(log),
		vgo.WithPingInterval(interval),
		vgo.WithPongTimeout(timeout),
		vgo.WithBackoff(vgo.Backoff{BaseDelay: backoff}),
		vgo.WithOnPong(func(rtt time.Duration) {
			log.WithFields(logrus.Fields{"remote": addr, "rtt": rtt}).Info("pong")
		}),
	)
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
