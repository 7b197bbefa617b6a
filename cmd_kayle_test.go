package kaylewebhook

import (
	"bytes"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// kayleRoot builds "caddy kayle" as caddycmd does.
func kayleRoot(t *testing.T) *cobra.Command {
	t.Helper()
	kayle, ok := caddycmd.Commands()["kayle"]
	if !ok {
		t.Fatal("the kayle command is not registered")
	}
	root := &cobra.Command{Use: kayle.Name + " " + kayle.Usage, Short: kayle.Short, Long: kayle.Long}
	kayle.CobraFunc(root)
	return root
}

// Each subcommand's --help documents exactly the flags it has, and the
// kayle command lists every subcommand.
func TestKayleCommandHelpMatchesFlags(t *testing.T) {
	root := kayleRoot(t)
	flagInText := regexp.MustCompile(`(?m)^--([a-z][a-z-]*)`)
	var names []string
	for _, sub := range root.Commands() {
		name := sub.Name()
		if name == "help" || name == "completion" {
			continue
		}
		names = append(names, name)
		t.Run(name, func(t *testing.T) {
			documented := map[string]bool{}
			// each flag is a paragraph of its own: "--name <value>" at the
			// start of a line, possibly "--a <x>, --b <y>"
			for _, line := range strings.Split(sub.Long, "\n") {
				if !flagInText.MatchString(line) {
					continue
				}
				for _, m := range regexp.MustCompile(`--([a-z][a-z-]*)`).FindAllStringSubmatch(line, -1) {
					documented[m[1]] = true
				}
			}
			for flag := range documented {
				if sub.Flags().Lookup(flag) == nil {
					t.Errorf("--help documents --%s, which does not exist", flag)
				}
			}
			sub.Flags().VisitAll(func(f *pflag.Flag) {
				if f.Name != "help" && !documented[f.Name] {
					t.Errorf("--%s is not documented in --help", f.Name)
				}
			})
			// the usage line names only real flags
			for _, m := range regexp.MustCompile(`--([a-z][a-z-]*)`).FindAllStringSubmatch(sub.Use, -1) {
				if sub.Flags().Lookup(m[1]) == nil {
					t.Errorf("usage %q names --%s, which does not exist", sub.Use, m[1])
				}
			}
			if !strings.Contains(root.Long, "\n    "+name+" ") || !strings.Contains(root.Use, name) {
				t.Errorf("caddy kayle's help does not list %s", name)
			}
		})
	}
	slices.Sort(names)
	if want := []string{"forget", "inspect", "jwk", "keygen", "queue", "send", "sweep"}; !slices.Equal(names, want) {
		t.Errorf("subcommands %v, want %v", names, want)
	}

	var help bytes.Buffer
	root.SetOut(&help)
	root.SetErr(&help)
	root.SetArgs([]string{})
	if err := root.Execute(); err != nil {
		t.Fatalf("bare kayle: %v", err)
	}
	for _, name := range names {
		if !strings.Contains(help.String(), "\n  "+name+" ") {
			t.Errorf("bare kayle does not list %s:\n%s", name, help.String())
		}
	}
}

// The subcommands run from their flags and arguments to their output and
// exit status, through cobra as caddy runs them.
func TestKayleSubcommandsThroughCobra(t *testing.T) {
	dir := t.TempDir()
	run := func(args ...string) (string, error) {
		root := kayleRoot(t)
		var out, notes bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&notes)
		root.SetArgs(args)
		err := root.Execute()
		return out.String(), err
	}

	out, err := run("keygen", "--bits", "2048", "--kid", "k1", "--out", dir)
	if err != nil {
		t.Fatal(err)
	}
	key, _, err := kayle.LoadPrivateKeyFile(dir + "/k1.pem")
	if err != nil {
		t.Fatal(err)
	}
	checkPublicJWK(t, []byte(out), &key.PublicKey, "k1")
	if _, err := run("keygen", "--bits", "2048", "--kid", "k1", "--out", dir); err == nil {
		t.Error("keygen overwrote k1.pem")
	}
	if _, err := run("keygen", "--bits", "1024", "--kid", "k2", "--out", dir); err == nil {
		t.Error("keygen made a 1024-bit key")
	}

	out, err = run("jwk", dir+"/k1.pem", "--kid", "k1")
	if err != nil {
		t.Fatal(err)
	}
	checkPublicJWK(t, []byte(out), &key.PublicKey, "k1")
	if _, err := run("jwk", dir+"/k1.pem"); err == nil {
		t.Error("jwk of a PEM without --kid did not fail")
	}

	config := writeConfig(t, "http://127.0.0.1:9 {\n"+kayleBlock(t, "\tstorage file_system "+dir+"/data")+"}\n")
	out, err = run("forget", "--config", config, "evt_a", "evt_b")
	if err != nil || !strings.Contains(out, "not found  evt_a\n") || !strings.Contains(out, "not found  evt_b\n") {
		t.Errorf("forget: %v\n%s", err, out)
	}
	if _, err := run("forget", "--config", config); err == nil {
		t.Error("forget with no event id did not fail")
	}

	body, sig, _ := inspectDelivery(t, inspectNow)
	if out, err := run("inspect", "--config", config, "--signature", sig, body); err != nil || strings.Contains(out, "Curie") {
		t.Errorf("inspect: %v\n%s", err, out)
	}
	if out, err := run("inspect", "--config", config, "--plaintext", body); err != nil || !strings.Contains(out, "Curie") {
		t.Errorf("inspect --plaintext: %v\n%s", err, out)
	}
}
