package vgo_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vgonet/vgo"
)

// silent keeps the examples' output to what they print.
func silent() *logrus.Logger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return l
}

// A client that sends one message to an echo server and prints the reply.
func ExampleClient() {
	srv, _ := vgo.NewServer(
		vgo.WithLogger(silent()),
		vgo.WithHandler(func(c *vgo.Conn, msg []byte) {
			_ = c.Send(context.Background(), msg)
		}),
	)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(l)
	defer srv.Close()

	replies := make(chan string, 1)
	client, err := vgo.NewClient(l.Addr().String(),
		vgo.WithLogger(silent()),
		vgo.WithPingInterval(time.Second),
		vgo.WithOnMessage(func(msg []byte) {
			replies <- string(msg) // msg is reused after the callback: copy it
		}),
	)
	if err != nil {
		fmt.Println(err)
		return
	}
	client.Start()
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := client.WaitConnected(ctx); err != nil {
		fmt.Println(err)
		return
	}
	if err := client.Send(ctx, []byte("hello")); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(<-replies)
	// Output: hello
}

// Shutdown tells connected clients the server is going away, then waits for
// their connections to end.
func ExampleServer_Shutdown() {
	srv, _ := vgo.NewServer(vgo.WithLogger(silent()))
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()

	causes := make(chan error, 1)
	client, _ := vgo.NewClient(l.Addr().String(),
		vgo.WithLogger(silent()),
		vgo.WithOnDisconnect(func(err error) { causes <- err }),
	)
	client.Start()
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = client.WaitConnected(ctx)

	fmt.Println("shutdown:", srv.Shutdown(ctx))
	fmt.Println("serve:", <-served)
	fmt.Println("client saw:", <-causes)
	// Output:
	// shutdown: <nil>
	// serve: vgo: server closed
	// client saw: vgo: closed by peer: going away: server shutting down
}

// A server that checks a token in each client's hello and keeps the user
// it names on the connection, and a client whose token it rejects: the
// client stops rather than retry.
func ExampleWithAuthenticator() {
	users := map[string]string{"token-of-alice": "alice"}
	greeted := make(chan string)
	srv, _ := vgo.NewServer(
		vgo.WithLogger(silent()),
		vgo.WithAuthenticator(func(c *vgo.Conn, token []byte) (any, error) {
			user, ok := users[string(token)]
			if !ok {
				return nil, errors.New("unknown token")
			}
			return user, nil
		}),
		vgo.WithHandler(func(c *vgo.Conn, msg []byte) {
			greeted <- fmt.Sprintf("%s says %s", c.Identity(), msg)
		}),
	)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(l)
	defer srv.Close()

	token := func(t string) vgo.ClientOption {
		return vgo.WithCredentials(func(context.Context) ([]byte, error) { return []byte(t), nil })
	}
	alice, _ := vgo.NewClient(l.Addr().String(), vgo.WithLogger(silent()), token("token-of-alice"))
	alice.Start()
	defer alice.Close()
	_ = alice.WaitConnected(context.Background())
	_ = alice.Send(context.Background(), []byte("hello"))
	fmt.Println(<-greeted)

	stranger, _ := vgo.NewClient(l.Addr().String(), vgo.WithLogger(silent()), token("guess"))
	stranger.Start()
	<-stranger.Done()
	fmt.Println(errors.Is(stranger.Err(), vgo.ErrUnauthorized))
	fmt.Println(stranger.Err())
	// Output:
	// alice says hello
	// true
	// vgo: unauthorized: closed by peer: unauthorized: unknown token
}

// Messages sent while no server is reachable wait in the send buffer and
// go out, in order, once the client connects.
func ExampleWithSendBuffer() {
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l.Addr().String()
	l.Close() // no server yet

	client, _ := vgo.NewClient(addr,
		vgo.WithLogger(silent()),
		vgo.WithBackoff(vgo.Backoff{BaseDelay: 10 * time.Millisecond}),
		vgo.WithSendBuffer(100, 64<<10, vgo.BufferFailNew),
	)
	client.Start()
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, m := range []string{"one", "two", "three"} {
		fmt.Println(m, client.Send(ctx, []byte(m)))
	}

	got := make(chan string, 3)
	srv, _ := vgo.NewServer(vgo.WithLogger(silent()),
		vgo.WithHandler(func(_ *vgo.Conn, msg []byte) { got <- string(msg) }))
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Println(err)
		return
	}
	go srv.Serve(l)
	defer srv.Close()
	fmt.Println(<-got, <-got, <-got)
	// Output:
	// one <nil>
	// two <nil>
	// three <nil>
	// one two three
}
