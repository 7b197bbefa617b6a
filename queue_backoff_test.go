package kaylewebhook

import (
	"net/http"
	"testing"
	"time"
)

func TestBackoffWaitDoublesUpToTheMax(t *testing.T) {
	max := time.Minute
	want := []time.Duration{0, time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 32 * time.Second, time.Minute, time.Minute}
	for failures, w := range want {
		if got := backoffWait(failures, max); got != w {
			t.Errorf("backoffWait(%d) = %s, want %s", failures, got, w)
		}
	}
	if got := backoffWait(1000, max); got != max {
		t.Errorf("after 1000 failures: %s", got)
	}
	for attempts := 1; attempts < 10; attempts++ {
		full := backoffWait(attempts, max)
		if got := eventRetryWait(attempts, max); got > full || got < full-full/5 {
			t.Errorf("eventRetryWait(%d) = %s, outside [%s, %s]", attempts, got, full-full/5, full)
		}
	}
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	header := func(v string) http.Header { return http.Header{"Retry-After": {v}} }
	cases := []struct {
		status int
		value  string
		want   time.Duration
	}{
		{429, "30", 30 * time.Second},
		{503, "2", 2 * time.Second},
		{503, now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{429, "999999999", maxRetryAfter}, // capped
		{429, "0", 0},
		{429, "-5", 0},
		{429, "soon", 0},
		{503, now.Add(-time.Minute).Format(http.TimeFormat), 0}, // in the past
		{500, "30", 0},                                          // only 429 and 503 ask
		{429, "", 0},
	}
	for _, c := range cases {
		if got := retryAfter(c.status, header(c.value), now); got != c.want {
			t.Errorf("retryAfter(%d, %q) = %s, want %s", c.status, c.value, got, c.want)
		}
	}
}

func TestBackendFailureOrEventRefusal(t *testing.T) {
	backend := []int{500, 502, 503, 504, 408, 429, 0}
	event := []int{400, 401, 403, 404, 409, 410, 413, 422}
	for _, s := range backend {
		if !isBackendFailure(s) {
			t.Errorf("%d should back the whole queue off", s)
		}
	}
	for _, s := range event {
		if isBackendFailure(s) {
			t.Errorf("%d is this event's refusal; the queue must go on", s)
		}
	}
}
