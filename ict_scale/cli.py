"""Where every command meets the user: a `UserError` becomes one line `error: ...` and exit status 2.

    if __name__ == "__main__":
        sys.exit(cli.run(main))

Under torchrun (or the DeepSpeed launcher) only global rank 0 prints the line; every rank exits with status 2
and records the message in torchrun's error file (TORCHELASTIC_ERROR_FILE), so that torchrun's own failure
report names the cause, also when only one rank hit it. `ICT_DEBUG=1` shows the full traceback instead.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Callable

from ict_scale.errors import UserError

USER_ERROR_EXIT = 2  # as argparse uses for a bad command line: 1 stays the status of a crash
DEBUG_ENV = "ICT_DEBUG"
# Other ranks wait this long before exiting, so that rank 0 prints its line before torchrun stops the group
# (ranks reach a config check seconds apart on a loaded machine; when rank 0 fails too, torchrun ends the wait).
PEER_EXIT_DELAY_S = 5.0


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (a library's multi-line text is joined, not dropped)."""
    lines = [part.strip() for part in str(e).splitlines() if part.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        # Re-raised by torch from a DataLoader worker: "Caught X in DataLoader worker process N. Original
        # Traceback ... pkg.X: message"; the message is the last line.
        lines = [re.sub(r"^[\w.]+: ", "", lines[-1], count=1)]
    return " ".join(lines) or type(e).__name__


def record_for_launcher(message: str) -> None:
    """Put the message where torchrun's failure report reads it (the traceback field of that rank)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # The layout torch's ErrorHandler writes (the report shows py_callstack); a bare string also works but
    # makes torchrun log two more warnings.
    data = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the report then says "To enable traceback see ..."; our own line is unaffected


def fail(message: str) -> int:
    """Print `error: message` (global rank 0 only) and return the exit status; other ranks stay silent."""
    rank = int(os.environ.get("RANK", "0") or 0)
    record_for_launcher(f"error: {message}")
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    elif int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        time.sleep(PEER_EXIT_DELAY_S)
    return USER_ERROR_EXIT


def run(main: Callable[..., int], argv: list[str] | None = None) -> int:
    """Call `main(argv)` (None: the process's arguments); a UserError escaping it becomes one line (see the
    module docstring)."""
    try:
        return main(argv)
    except UserError as e:
        if debugging():
            raise
        code = fail(one_line(e))
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # A process group, loader workers or collective threads may still be alive after the failure; leaving
        # at once avoids both a hang and the abort at interpreter exit that a live gloo group can cause.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
