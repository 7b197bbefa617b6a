package main

import (
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// fsyncCost is the mean time to write a small file and fsync it in dir:
// the unit a storage round trip on that disk is counted in.
func fsyncCost(dir string, n int) (time.Duration, error) {
	buf := make([]byte, 512)
	t0 := time.Now()
	for i := range n {
		f, err := os.Create(filepath.Join(dir, "fsync-probe-"+strconv.Itoa(i)))
		if err != nil {
			return 0, err
		}
		if _, err := f.Write(buf); err != nil {
			f.Close()
			return 0, err
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return 0, err
		}
		f.Close()
	}
	d := time.Since(t0) / time.Duration(n)
	for i := range n {
		os.Remove(filepath.Join(dir, "fsync-probe-"+strconv.Itoa(i)))
	}
	return d, nil
}

func mean(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return sum / time.Duration(len(ds))
}
