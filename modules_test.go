package kaylewebhook

// The tests load the file_system storage module by name, as a config would.
import _ "github.com/caddyserver/caddy/v2/modules/filestorage"
