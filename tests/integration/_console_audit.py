"""Run `raytrain <args>` with every console line marked by who wrote it (tests/integration/test_tracking.py).

    python tests/integration/_console_audit.py train --config jobs/tiny/shapes.yaml data.num_images=200 ...

A line is raytrain's when a raytrain logger ("raytrain.*") wrote it, or the print() of code in the
raytrain package. sys.stdout / sys.stderr are replaced by writers that look
up the stack at the first write of each line (past the standard library: print, logging, warnings,
io) and prefix raytrain's lines with MARK. Everything else stays unmarked and counts as foreign:
other packages' Python output (Ray's log forwarding, warnings raised in a library, tqdm bars) and
anything written below Python (C++ logs of Ray's core worker write to file descriptor 2 directly).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import sysconfig
import threading

MARK = "@raytrain@ "
_STDLIB = tuple(os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib"))
_HERE = os.path.realpath(__file__)


# print() replacements that Ray installs in a process (ray.experimental.tqdm_ray once a Ray progress
# bar exists, Ray Train's print patch in its workers) forward their caller's print: look past them.
PRINT_WRAPPERS = {"safe_print", "redirected_print"}


def _origin_is_raytrain() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        record = frame.f_locals.get("record") if code.co_name == "emit" else None
        if isinstance(record, logging.LogRecord):  # a logging handler writing: whose logger is it
            return record.name == "raytrain" or record.name.startswith("raytrain.")
        path = os.path.realpath(code.co_filename)
        in_stdlib = path.startswith(_STDLIB) and "site-packages" not in path
        if not (in_stdlib or path == _HERE or code.co_filename.startswith("<") or code.co_name in PRINT_WRAPPERS):
            return str(frame.f_globals.get("__name__", "")).startswith("raytrain")
        frame = frame.f_back
    return False


class MarkingWriter(io.TextIOBase):
    """Line-buffers writes and forwards each finished line, marked when raytrain wrote it."""

    def __init__(self, inner):
        self.inner = inner
        self.lock = threading.Lock()
        self.buf = ""
        self.ours = False

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self.lock:
            if not self.buf:
                self.ours = _origin_is_raytrain()
            self.buf += s
            while "\n" in self.buf:
                line, self.buf = self.buf.split("\n", 1)
                self.inner.write((MARK if self.ours else "") + line + "\n")
                if self.buf:
                    self.ours = _origin_is_raytrain()
            self.inner.flush()
        return len(s)

    def flush(self) -> None:
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return False


def main() -> int:
    sys.stdout = MarkingWriter(sys.stdout)
    sys.stderr = MarkingWriter(sys.stderr)
    from raytrain.cli import main as cli_main

    try:
        return cli_main(sys.argv[1:])
    finally:
        for w in (sys.stdout, sys.stderr):
            if isinstance(w, MarkingWriter) and w.buf:
                w.write("\n")


if __name__ == "__main__":
    sys.exit(main())
