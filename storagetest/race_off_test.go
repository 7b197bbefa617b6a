//go:build !race

package storagetest

// raceBuild: see race_on_test.go.
const raceBuild = false
