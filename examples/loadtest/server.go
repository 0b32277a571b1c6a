package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vgonet/vgo"
)

// shutdownLimit bounds the server's graceful stop; the server is closed
// if Shutdown has not returned by then.
const shutdownLimit = 20 * time.Second

// runServer is the server process: a vgo server with heartbeats on, which
// counts pings and closes, reports its connection count once a second and
// answers the parent's commands until quit, shutdown, end of input or ctx.
func runServer(ctx context.Context, cfg config, log *logrus.Entry) error {
	var opened, closed, stale, pings atomic.Uint64
	srv, err := vgo.NewServer(
		vgo.WithLogger(libLogger(cfg, log)),
		vgo.WithHeartbeatTimeout(cfg.serverTimeout),
		vgo.WithDrainWindow(cfg.drain),
		vgo.WithAdmission(cfg.maxHandshakes, cfg.retryAfter),
		vgo.WithOnPing(func(*vgo.Conn) { pings.Add(1) }),
		vgo.WithOnConnOpen(func(*vgo.Conn) { opened.Add(1) }),
		vgo.WithOnConnClose(func(_ *vgo.Conn, err error) {
			closed.Add(1)
			if errors.Is(err, vgo.ErrHeartbeatTimeout) {
				stale.Add(1)
			}
		}),
	)
	if err != nil {
		return err
	}
	inner, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	ln := &watchedListener{Listener: inner}
	out := newOutput(os.Stdout)
	cmds := readCommands()
	defer cmds.stop()

	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	served := make(chan error, 1)
	wg.Go(func() {
		// Only this process shuts the server down or closes it, and then
		// the end of Serve is expected.
		if err := srv.Serve(ln); !errors.Is(err, vgo.ErrServerClosed) {
			served <- fmt.Errorf("serve: %w", err)
		}
	})
	wg.Go(func() {
		tick(ctx, time.Second, func() {
			_ = out.send(msgProgress, serverProgress{Conns: srv.Len(), Pings: pings.Load()})
		})
	})
	defer func() {
		cancel()
		srv.Close()
		wg.Wait()
	}()

	log.WithFields(logrus.Fields{"addr": ln.Addr().String(), "timeout": cfg.serverTimeout, "drain": cfg.drain}).Info("server listening")
	if err := out.send(msgReady, readyMsg{PID: os.Getpid(), Addr: ln.Addr().String()}); err != nil {
		return err
	}

	stats := func() serverStats {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		vs := srv.Stats()
		return serverStats{
			Conns:         srv.Len(),
			Opened:        opened.Load(),
			Closed:        closed.Load(),
			Stale:         stale.Load(),
			Pings:         pings.Load(),
			HeapAlloc:     ms.HeapAlloc,
			HeapInuse:     ms.HeapInuse,
			HeapSys:       ms.HeapSys,
			HeapReleased:  ms.HeapReleased,
			StackInuse:    ms.StackInuse,
			Sys:           ms.Sys,
			Goroutines:    runtime.NumGoroutine(),
			NumGC:         ms.NumGC,
			AcceptErrors:  ln.errs.Load(),
			LastAcceptErr: ln.lastErr(),
			Accepted:      vs.Accepted,
			Refused:       vs.Refused,
			Throttled:     vs.Throttled,
		}
	}
	return serveCommands(ctx, log, cmds, out, served, func(name, arg string) (bool, error) {
		switch name {
		case cmdStats:
			return true, out.send(name, stats())
		case cmdGC:
			runtime.GC()
			debug.FreeOSMemory()
			return true, out.send(name, stats())
		case cmdHeapProfile:
			runtime.GC() // the profile shows the heap as of the last collection
			return true, reply(out, name, writeHeapProfile(arg))
		case cmdShutdown:
			if err := out.send(name, shutdown(ctx, srv, log)); err != nil {
				return true, err
			}
			return true, errQuit
		}
		return false, nil
	})
}

// watchedListener counts failed accepts, such as running out of file
// descriptors, which vgo retries and logs only at warn level.
type watchedListener struct {
	net.Listener
	errs atomic.Uint64
	mu   sync.Mutex
	last string
}

func (l *watchedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		l.errs.Add(1)
		l.mu.Lock()
		l.last = classify(err)
		l.mu.Unlock()
	}
	return c, err
}

func (l *watchedListener) lastErr() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.last
}

// shutdown stops srv gracefully, or closes it if that takes longer than
// shutdownLimit, and reports how it went.
func shutdown(ctx context.Context, srv *vgo.Server, log *logrus.Entry) shutdownReply {
	r := shutdownReply{Conns: srv.Len()}
	log.WithField("conns", r.Conns).Info("shutting down")
	start := time.Now()
	sctx, cancel := context.WithTimeout(ctx, shutdownLimit)
	err := srv.Shutdown(sctx)
	cancel()
	r.Took = int64(time.Since(start))
	if err != nil {
		r.Err = err.Error()
		log.WithField("err", err).Warn("shutdown did not finish; closing")
		srv.Close()
	}
	if cpu, err := readCPU(os.Getpid()); err == nil {
		r.CPU = int64(cpu)
	}
	return r
}
