// Package childproc starts the child processes of the example tools:
// their own binary again, in another role, talked to over stdin and
// stdout.
package childproc

import (
	"context"
	"io"
	"os"
	"os/exec"
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
