package vgo

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestClientDisconnectCauseAfterClose(t *testing.T) {
	// The server hangs up as soon as it reads the close frame, sometimes
	// before the client has finished closing: the cause must still be the
	// client's own Close.
	_, addr := startServer(t)
	for i := range 20 {
		causes := make(chan error, 1)
		c := newTestClient(t, addr, WithOnDisconnect(func(err error) { causes <- err }))
		require.NoError(t, c.WaitConnected(testContext(t)))
		require.NoError(t, c.Close())
		err := recv(t, causes)
		require.True(t, errors.Is(err, ErrClosed), "round %d: %v", i, err)
	}
}
