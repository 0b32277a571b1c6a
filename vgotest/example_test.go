package vgotest_test

import (
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"sync"
	"time"

	"github.com/vgonet/vgo/vgotest"
)

// echoServer serves on a free loopback port, writing back whatever it reads.
// The returned function stops it and waits for its goroutines.
func echoServer() (addr string, stop func()) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String(), func() {
		ln.Close()
		wg.Wait()
	}
}

// A test freezes a link to check that a silent network is noticed only by
// a timeout, and that the connection recovers once the network is back.
func ExampleProxy() {
	addr, stop := echoServer()
	defer stop()

	// The client dials the proxy instead of the server.
	proxy, err := vgotest.NewProxy(addr)
	if err != nil {
		log.Fatal(err)
	}
	// Close runs before stop: it resets the proxy's connections, which
	// ends the echo server's handlers.
	defer proxy.Close()
	conn, err := net.Dial("tcp", proxy.Addr())
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()

	buf := make([]byte, 4)
	readEcho := func(timeout time.Duration) error {
		conn.SetReadDeadline(time.Now().Add(timeout))
		_, err := io.ReadFull(conn, buf)
		return err
	}

	proxy.Freeze()
	conn.Write([]byte("ping"))
	err = readEcho(50 * time.Millisecond)
	fmt.Println("while frozen, timed out:", errors.Is(err, os.ErrDeadlineExceeded))

	proxy.Thaw()
	err = readEcho(10 * time.Second)
	fmt.Printf("after thaw: %q %v\n", buf, err)
	// Output:
	// while frozen, timed out: true
	// after thaw: "ping" <nil>
}
