package main

import (
	"context"
	"errors"
	"net"
	"os"
	"runtime"

	"github.com/sirupsen/logrus"
	"github.com/vgonet/vgo"
)

// runServer is a server child: it serves the vgo server or the plain one
// on a loopback port, tells the parent the address, and answers the
// parent's commands until told to quit. Quitting ends the process, which
// closes every connection from the server's side.
func runServer(ctx context.Context, role string, log *logrus.Entry) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	var (
		serve func() error
		conns func() int
		done  = make(chan error, 1)
	)
	switch role {
	case roleServerVGO:
		quiet := logrus.New()
		quiet.SetOutput(os.Stderr)
		quiet.SetFormatter(log.Logger.Formatter)
		quiet.SetLevel(logrus.WarnLevel)
		srv, err := vgo.NewServer(
			vgo.WithLogger(quiet.WithFields(log.Data)),
			vgo.WithHandler(func(c *vgo.Conn, p []byte) { _ = c.Send(context.Background(), p) }),
		)
		if err != nil {
			return err
		}
		defer srv.Close()
		serve = func() error {
			if err := srv.Serve(ln); !errors.Is(err, vgo.ErrServerClosed) {
				return err
			}
			return nil
		}
		conns = srv.Len
	default:
		p := &plainServer{log: log}
		defer ln.Close()
		serve = func() error { return p.serve(ln) }
		conns = func() int { return int(p.conns.Load()) }
	}
	go func() { done <- serve() }()
	if err := tell(msg{Kind: kindReady, Addr: ln.Addr().String()}); err != nil {
		return err
	}
	log.WithField("addr", ln.Addr().String()).Info("server listening")

	errc := make(chan error, 1)
	go func() {
		errc <- commands(ctx, func(_ context.Context, m msg) (msg, error) {
			if m.Kind != kindMem {
				return msg{}, errors.New("unknown command " + m.Kind)
			}
			runtime.GC()
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			return msg{Mem: &memReport{
				HeapAlloc:  ms.HeapAlloc,
				StackInuse: ms.StackInuse,
				Goroutines: runtime.NumGoroutine(),
				Conns:      conns(),
			}}, nil
		})
	}()
	select {
	case err := <-errc:
		return err
	case err := <-done:
		if err == nil {
			err = errors.New("server stopped by itself")
		}
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
