package kaylewebhook

import (
	"crypto/rand"
	"encoding/hex"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

// The "caddy kayle" command and the helpers its subcommands share; each
// subcommand lives in its own cmd_<name>.go.
func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "kayle",
		Usage: "send [flags]",
		Short: "Tools for the kayle_webhook handler",
		Long: `
Tools for testing a kayle_webhook gateway. Run "caddy kayle send --help".
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.AddCommand(newSendCommand())
		},
	})
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	return hex.EncodeToString(b)
}

func withNewline(b []byte) string {
	if len(b) > 0 && b[len(b)-1] != '\n' {
		return string(b) + "\n"
	}
	return string(b)
}
