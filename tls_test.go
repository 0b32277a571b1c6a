package vgo

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testTLS makes a self-signed certificate for 127.0.0.1 that lives as long
// as the test, and returns a server config holding it and a client config
// that trusts it.
func testTLS(t *testing.T) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "vgo test"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	server = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
	client = &tls.Config{RootCAs: roots}
	return server, client
}

func TestTLSRoundTrip(t *testing.T) {
	serverCfg, clientCfg := testTLS(t)
	_, addr := startServer(t, WithTLSConfig(serverCfg), echoHandler(t))
	got := make(chan string, 1)
	c := newTestClient(t, addr, WithTLSConfig(clientCfg), WithOnMessage(func(msg []byte) { got <- string(msg) }))
	require.NoError(t, c.WaitConnected(testContext(t)))
	require.NoError(t, c.Send(testContext(t), []byte("secret")))
	assert.Equal(t, "secret", recv(t, got))
	assert.Empty(t, clientCfg.ServerName, "the caller's config is not modified")
}

func TestTLSMismatchFailsClearly(t *testing.T) {
	serverCfg, clientCfg := testTLS(t)

	t.Run("plaintext client, TLS server", func(t *testing.T) {
		_, addr := startServer(t, WithTLSConfig(serverCfg))
		closed := make(chan error, 1)
		newTestClient(t, addr, WithMaxAttempts(1), WithOnClose(func(err error) { closed <- err }))
		err := recv(t, closed)
		assert.ErrorIs(t, err, ErrGaveUp)
		assert.NotErrorIs(t, err, ErrHandshakeTimeout, "a mismatch must fail fast, not hang: %v", err)
	})
	t.Run("untrusted certificate", func(t *testing.T) {
		_, addr := startServer(t, WithTLSConfig(serverCfg))
		closed := make(chan error, 1)
		newTestClient(t, addr, WithMaxAttempts(1), WithTLSConfig(&tls.Config{}),
			WithOnClose(func(err error) { closed <- err }))
		err := recv(t, closed)
		var unknown x509.UnknownAuthorityError
		assert.ErrorAs(t, err, &unknown)
	})
	t.Run("TLS client, plaintext server", func(t *testing.T) {
		_, addr := startServer(t)
		closed := make(chan error, 1)
		newTestClient(t, addr, WithMaxAttempts(1), WithTLSConfig(clientCfg),
			WithOnClose(func(err error) { closed <- err }))
		assert.ErrorIs(t, recv(t, closed), ErrGaveUp)
	})
}

func TestTLSCloseDuringHandshake(t *testing.T) {
	// A server that accepts and never answers the TLS handshake: Close
	// interrupts the handshake at once.
	accepted := make(chan struct{}, 1)
	rs := newRawServer(t, func(nc net.Conn) {
		accepted <- struct{}{}
		drain(newFrameReader(nc, DefaultMaxFrameSize))
	})
	_, clientCfg := testTLS(t)
	c := newTestClient(t, rs.addr(), WithTLSConfig(clientCfg), WithHandshakeTimeout(time.Hour))
	recv(t, accepted)
	closeWithin(t, c, time.Second)
}
