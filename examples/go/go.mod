module github.com/caddy-kayle-webhook/caddy-kayle-webhook/examples/go

go 1.22

require github.com/standard-webhooks/standard-webhooks/libraries v0.0.1
