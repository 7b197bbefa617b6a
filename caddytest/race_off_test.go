//go:build !race

package caddytest

// raceBuild: see race_on_test.go.
const raceBuild = false
