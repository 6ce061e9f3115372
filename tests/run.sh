#!/usr/bin/env bash
# Run the suite with the given interpreter; "no tests collected" (pytest exit 5) is a failure, not a pass.
# The whole run is bounded (TEST_TIMEOUT seconds, default 40 min; it takes ~6 min on 2 cores), so a process
# that cannot exit fails the run quickly instead of holding it until an outer limit.
set -u
py="$1"; shift
limit="${TEST_TIMEOUT:-2400}"
timeout --kill-after=30 "$limit" "$py" -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "error: the test run did not end within ${limit}s (TEST_TIMEOUT)" >&2
fi
exit "$rc"
