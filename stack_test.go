//go:build linux && !race

package vgo

import (
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The race detector makes every frame larger, so this test runs without
// it (.ci/run runs it on its own); and only on Linux, where an idle reader
// waits on its raw socket.

// stackChildEnv marks the process that TestIdleReaderKeepsSmallStack runs
// the measurement in.
const stackChildEnv = "VGO_STACK_CHILD"

func TestIdleReaderKeepsSmallStack(t *testing.T) {
	// A connection that has been through its handshake and answered
	// pings waits for input on the goroutine's first stack, 2 KiB: its
	// reader's frames, with the read deadline being moved, fit in it.
	//
	// The runtime starts goroutines with the average stack its last
	// collection saw, which in a test binary is the test framework's as
	// much as the readers'; a server's thousands of readers set their own
	// average. The measurement runs in a process of its own where every
	// goroutine starts at 2 KiB, so that a larger stack means a reader
	// grew it.
	//
	// It also runs without background collections. With them, in about a
	// third of runs every reader ends up with 4 KiB after the pings, and
	// with none of them without: a collection running while the readers
	// answer takes a path, not yet found, that their stacks cannot hold.
	// This test guards the frames the readers themselves put on the stack;
	// BENCHMARKS.md describes the rest.
	if os.Getenv(stackChildEnv) == "" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestIdleReaderKeepsSmallStack$", "-test.v")
		cmd.Env = append(os.Environ(), stackChildEnv+"=1", "GODEBUG=adaptivestackstart=0", "GOGC=off")
		out, err := cmd.CombinedOutput()
		t.Logf("%s", out)
		require.NoError(t, err)
		return
	}
	const n = 400
	_, addr := startServer(t, WithHeartbeatTimeout(time.Minute))
	_, before := heapInUse()
	clients := dialMany(t, addr, n, rawHello(ProtocolVersion))
	readers := make([]*frameReader, n)
	for i, nc := range clients {
		readers[i] = newFrameReader(nc, DefaultMaxFrameSize)
		require.NoError(t, nc.SetReadDeadline(time.Now().Add(waitFor)))
		ft, _, err := readers[i].next()
		require.NoError(t, err)
		require.Equal(t, frameHello, ft)
	}
	// Two pings each, the second after the first's pong: the deadline
	// moves in between.
	ping := appendFrame(nil, framePing, make([]byte, 8))
	for range 2 {
		for _, nc := range clients {
			_, err := nc.Write(ping)
			require.NoError(t, err)
		}
		for i, nc := range clients {
			require.NoError(t, nc.SetReadDeadline(time.Now().Add(waitFor)))
			ft, _, err := readers[i].next()
			require.NoError(t, err)
			require.Equal(t, framePong, ft)
		}
	}
	_, after := heapInUse()
	perConn := (float64(after) - float64(before)) / n
	t.Logf("stack per idle connection: %.0f B", perConn)
	assert.Less(t, perConn, 3000.0, "the readers' stacks grew past 2 KiB")
}
