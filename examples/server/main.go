// Command server runs a vgo echo server: it sends every data frame back to
// the client that sent it, and closes clients that stay silent for longer
// than -timeout. It logs connects and disconnects, and with -v each ping
// too. It runs until SIGINT or SIGTERM, then shuts down gracefully.
//
// Behind a load balancer that sends the PROXY protocol, list the
// balancer's networks in -proxy-protocol: the server then logs the
// clients' own addresses, and refuses PROXY headers from anywhere else.
//
// With -resume the server keeps a session for each client that asks for
// one (the example client's -resume), for two minutes after its connection
// drops: a client that comes back within them resumes the session, and
// each side receives every message of the other exactly once and in order,
// echoes included. The server logs a resumed session as "client resumed its
// session"; "client connected" and "client disconnected" then mark the start
// and the end of a session rather than of each connection.
//
// Usage:
//
//	go run ./examples/server -addr :9966 -timeout 15s [-resume] [-proxy-protocol 10.0.0.0/8,192.168.1.5/32] [-v]
package main

import (
	"context"
	"errors"
	"expvar"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vgonet/vgo"
)

// shutdownTimeout bounds the graceful shutdown; connections still open
// after it are closed without waiting further.
const shutdownTimeout = 5 * time.Second

func main() {
	addr := flag.String("addr", ":9966", "TCP address to listen on")
	timeout := flag.Duration("timeout", vgo.DefaultHeartbeatTimeout,
		"close a client after this long without hearing from it; keep it above the clients' ping interval")
	statsAddr := flag.String("stats", "", "address to publish the server's stats on through expvar at /debug/vars; empty for none")
	verbose := flag.Bool("v", false, "log each ping as well (at debug level)")
	resume := flag.Bool("resume", false,
		"keep each client's session for 2m after its connection drops, so that a client run with -resume loses no message when it reconnects")
	var trusted []netip.Prefix
	flag.Func("proxy-protocol",
		"comma-separated `CIDRS` of trusted load balancers whose PROXY protocol headers (v1 or v2) give the clients' addresses; a bare IP means that host",
		func(v string) error {
			var err error
			trusted, err = parseNetworks(v)
			return err
		})
	flag.Parse()

	level := logrus.InfoLevel
	if *verbose {
		level = logrus.DebugLevel
	}
	log := newLogger(level)
	opts := []vgo.ServerOption{vgo.WithHeartbeatTimeout(*timeout)}
	if trusted != nil {
		opts = append(opts, vgo.WithProxyProtocol(trusted...))
		log.WithField("trusted", fmt.Sprint(trusted)).Info("PROXY protocol on")
	}
	if *resume {
		opts = append(opts,
			vgo.WithSessions(vgo.Sessions{}),
			// vgo logs a resume at info level, which the warn-level logger
			// below hides like the connects and disconnects.
			vgo.WithOnConnResume(func(c *vgo.Conn) {
				connLog(log, c).Info("client resumed its session")
			}),
		)
		log.WithField("window", vgo.DefaultResumeWindow).Info("sessions on")
	}
	if err := run(*addr, *statsAddr, opts, log); err != nil {
		log.WithField("err", err).Error("server failed")
		os.Exit(1)
	}
}

func run(addr, statsAddr string, opts []vgo.ServerOption, log *logrus.Logger) error {
	srv, err := vgo.NewServer(append(opts,
		// vgo logs every connect and disconnect at info level itself. The
		// callbacks below log those events instead, so vgo's own logger
		// only lets warnings through: failed handshakes, refused and
		// misbehaving peers, accept errors.
		vgo.WithLogger(newLogger(logrus.WarnLevel)),
		vgo.WithOnConnOpen(func(c *vgo.Conn) {
			connLog(log, c).Info("client connected")
		}),
		vgo.WithOnConnClose(func(c *vgo.Conn, err error) {
			// vgo has already logged this one at warn level.
			if errors.Is(err, vgo.ErrProtocol) {
				return
			}
			connLog(log, c).WithField("err", err).Info("client disconnected")
		}),
		vgo.WithOnPing(func(c *vgo.Conn) {
			// Pings outnumber every other event by far; at info they
			// would bury the connects and disconnects.
			if log.IsLevelEnabled(logrus.DebugLevel) {
				connLog(log, c).Debug("received ping")
			}
		}),
		vgo.WithHandler(func(c *vgo.Conn, msg []byte) {
			// A failed send closes the connection, and the close callback
			// logs the cause.
			_ = c.Send(context.Background(), msg)
		}),
	)...)
	if err != nil {
		return err
	}

	if statsAddr != "" {
		stop, err := publishStats(srv, statsAddr, log)
		if err != nil {
			return err
		}
		defer stop()
	}

	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	log.WithField("addr", l.Addr().String()).Info("listening")

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}

	log.WithField("timeout", shutdownTimeout).Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.WithField("err", err).Warn("graceful shutdown did not finish; closing the remaining connections")
		srv.Close()
	}
	if err := <-served; !errors.Is(err, vgo.ErrServerClosed) {
		return err
	}
	log.Info("stopped")
	return nil
}

// publishStats serves the server's counters as the expvar "vgo" at
// http://statsAddr/debug/vars, and returns a function that stops serving.
func publishStats(srv *vgo.Server, statsAddr string, log logrus.FieldLogger) (func(), error) {
	expvar.Publish("vgo", expvar.Func(func() any { return srv.Stats() }))
	l, err := net.Listen("tcp", statsAddr)
	if err != nil {
		return nil, err
	}
	hs := &http.Server{Handler: expvar.Handler(), ReadHeaderTimeout: 5 * time.Second}
	served := make(chan struct{})
	go func() {
		defer close(served)
		if err := hs.Serve(l); !errors.Is(err, http.ErrServerClosed) {
			log.WithField("err", err).Warn("stats server failed")
		}
	}()
	log.WithField("addr", "http://"+l.Addr().String()+"/debug/vars").Info("publishing stats")
	return func() {
		hs.Close()
		<-served
	}, nil
}

// newLogger returns a logger writing text lines with millisecond
// timestamps to stderr.
func newLogger(level logrus.Level) *logrus.Logger {
	l := logrus.New()
	l.SetLevel(level)
	l.SetFormatter(&logrus.TextFormatter{
		FullTimestamp:   true,
		TimestampFormat: "2006-01-02T15:04:05.000Z07:00",
	})
	return l
}

// parseNetworks parses a comma-separated list of networks in CIDR
// notation, taking a bare address as the network of that one host.
func parseNetworks(list string) ([]netip.Prefix, error) {
	var nets []netip.Prefix
	for _, f := range strings.Split(list, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if !strings.Contains(f, "/") {
			a, err := netip.ParseAddr(f)
			if err != nil {
				return nil, err
			}
			nets = append(nets, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, err
		}
		nets = append(nets, p)
	}
	if len(nets) == 0 {
		return nil, errors.New("no network given")
	}
	return nets, nil
}

func connLog(log logrus.FieldLogger, c *vgo.Conn) logrus.FieldLogger {
	return log.WithFields(logrus.Fields{"conn": c.ID(), "remote": c.RemoteAddr().String()})
}
