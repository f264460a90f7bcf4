"""Temporary directories whose user cannot say when it is done: removed when the process exits.

Most of raytrain's temporary files have a clear end (a `with tempfile.TemporaryDirectory()` block,
a context manager that yields a path). Two do not: a checkpoint downloaded for an object that keeps
the files for its whole life (an eval actor), and the file store of a one-rank process group that
lives until its caller destroys the group, or forever. Those go in `until_exit` directories, removed
by an atexit handler, so nothing is left in the temp dir after a normal exit (also a Ray actor's:
Ray runs atexit handlers when an actor goes out of scope; a SIGKILL or `ray.kill` runs none).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def until_exit(prefix: str) -> Path:
    """A fresh directory in the temp dir (`tempfile.gettempdir()`, $TMPDIR), removed with everything
    in it when this process exits."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(_remove, d, os.getpid())
    return d


def _remove(d: Path, owner: int) -> None:
    # a forked child inherits the handler: only the process that made the directory removes it
    if os.getpid() == owner:
        shutil.rmtree(d, ignore_errors=True)
