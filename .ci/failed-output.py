#!/usr/bin/env python3
"""Prints what each failing test wrote, from `go test -v` output on stdin.

go test -v marks whose output follows with "=== RUN/CONT/NAME <test>" lines,
so the lines of parallel tests can be told apart; a failure's messages are
often far from its "--- FAIL" line.
"""
import re
import sys

marker = re.compile(r"^=== (RUN|CONT|NAME|PAUSE)\s+(\S+)")
failing = re.compile(r"^\s*--- FAIL: (\S+)")
output, current, failed = {}, None, []
for line in sys.stdin:
    m = marker.match(line)
    if m:
        current = m.group(2)
        continue
    f = failing.match(line)
    if f:
        failed.append(f.group(1))
        continue
    if current and re.match(r"^\s+\S+_test\.go:\d+: ", line):
        output.setdefault(current, []).append(line.rstrip("\n"))
for name in failed:
    lines = output.get(name, [])
    if lines:
        print(f"--- output of {name} (last 60 lines):")
        print("\n".join(lines[-60:]))
