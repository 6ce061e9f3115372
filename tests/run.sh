#!/usr/bin/env bash
# Run the suite with the given interpreter; "no tests collected" (pytest exit 5) is a failure, not a pass.
set -u
py="$1"; shift
"$py" -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
