// Package childproc starts the child processes of the example tools,
// their own binary again in another role, talked to with JSON over stdin
// and stdout, and keeps the flags only a parent passes out of -help.
package childproc

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"syscall"
)

// Start runs exe with args, its stderr the caller's, and returns the
// command and pipes to its stdin and from its stdout. ctx ending kills
// the child, and so does the death of the thread that started it
// (Pdeathsig): a child must not outlive the parent, and one whose parent
// died some other way still finds the end of its stdin.
func Start(ctx context.Context, exe string, args ...string) (*exec.Cmd, io.WriteCloser, io.ReadCloser, error) {
	cmd := exec.CommandContext(ctx, exe, args...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, nil, err
	}
	return cmd, stdin, stdout, nil
}

// Decode hands fn each JSON value a child writes on stdout, in order,
// until the stream ends, then reads and drops whatever is left so that
// the child never blocks on a full pipe while it exits. It returns the
// error that ended the stream early, nil at its end.
func Decode[T any](stdout io.Reader, fn func(T)) error {
	dec := json.NewDecoder(stdout)
	var err error
	for {
		var v T
		if err = dec.Decode(&v); err != nil {
			break
		}
		fn(v)
	}
	_, _ = io.Copy(io.Discard, stdout)
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// Usage sets fs's usage text to its flags without those hidden names,
// which only a parent passes to its children.
func Usage(fs *flag.FlagSet, hidden ...string) {
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage of %s:\n", os.Args[0])
		fs.VisitAll(func(f *flag.Flag) {
			if slices.Contains(hidden, f.Name) {
				return
			}
			fmt.Fprintf(fs.Output(), "  -%s\n    \t%s (default %q)\n", f.Name, f.Usage, f.DefValue)
		})
	}
}
