"""What a raytrain command prints: its own lines, and as little else as a healthy run allows.

    setup(verbose)            the CLI calls it first: raytrain's log lines on stdout, other libraries'
                              loggers at WARNING minus known noise, their progress bars off;
                              verbose=True leaves every library (and Ray's worker logs) as it is
    verbose()                 whether --verbose was given (init_ray forwards Ray's worker logs then)
    TrainProgress(total)      one line per training report: step / total, loss, samples/s, ETA
    progress(rows, total)     a periodic line while iterating, e.g. an evaluation's predictions
    ReportStream(sinks)       every training report as it happens, in the process that runs fit()

Without --verbose the driver does not receive its Ray workers' output at all (`log_to_driver=False`):
Ray Train's controller, its workers and the Ray Data actors print per-report dumps, state-API retries,
progress bars and library banners that no one acts on, and raytrain's own worker-side step lines
are replaced by TrainProgress, fed from the reports (ReportStream). Ray still writes everything to its
session log directory (printed once, so a failure can be investigated); a failed worker's traceback
reaches the driver in the error fit() raises.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from typing import Callable, Iterable, Iterator

log = logging.getLogger("raytrain.console")

# None until setup(): code that runs raytrain in-process (tests, notebooks, `raytrain serve`) keeps
# Ray's and the libraries' output as it always was; only the CLI's train / eval / tune / prepare are quiet.
_VERBOSE: bool | None = None

# Library messages that are not a warning a user can act on, matched as substrings of the message.
# Each is here because a successful run printed it; keep the reason next to it.
KNOWN_NOISE = (
    # Ray 2.60 notice on every local cluster start; nothing to change for a loopback cluster
    "Token authentication is enabled for this Ray cluster",
    # raytrain turns Ray Data's progress bars off on purpose (configure_ray_data)
    "Progress bars disabled. To enable",
    # Ray Train V2 on clusters without the dashboard: its detached placement-group cleaner polls the
    # state API, which is not there; raytrain reaps stopped trials' groups itself (launch/tune.py)
    "Failed to query Ray Train Controller actor state",
    # Ray Tune timing notes about its own loop (a sweep callback step on a loaded machine)
    "which may be a performance bottleneck",
)

# Environment of a quiet driver: library progress bars (weights loading, shard writing) off. The
# workers' output does not reach a quiet driver at all, so their environment is left alone.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" / "Writing model shards" bars
    "TQDM_DISABLE": "1",  # any other tqdm bar (tqdm >= 4.66 reads it)
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # MLflow sets its own logger's level on import (INFO: SQLite table creation)
    # Ray Tune's newer output engine prints an experiment table and result paths even at verbose=0;
    # the classic one prints nothing at verbose=0 (launch/tune.py passes 0 unless --verbose)
    "RAY_AIR_NEW_OUTPUT": "0",
}


class NoiseFilter(logging.Filter):
    """Drops records whose message contains one of KNOWN_NOISE."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001  a malformed record is not ours to judge
            return True
        return not any(n in msg for n in KNOWN_NOISE)


class _Formatter(logging.Formatter):
    """raytrain's lines: `HH:MM:SS message`; another library's warning keeps its logger name and level
    so it is clear whose it is."""

    def format(self, record: logging.LogRecord) -> str:
        t = self.formatTime(record, "%H:%M:%S")
        msg = record.getMessage()
        if record.exc_info:
            msg = msg + "\n" + self.formatException(record.exc_info)
        if record.name == "raytrain" or record.name.startswith("raytrain."):
            return f"{t} {msg}"
        return f"{t} {record.levelname} [{record.name}] {msg}"


def verbose() -> bool:
    """Whether Ray's and every library's output is printed as they print it: --verbose, or a process
    that never called setup()."""
    return _VERBOSE is not False


def setup(verbose: bool = False) -> None:
    """Configure this process's console for a raytrain command (the CLI calls it before anything else).

    raytrain's loggers print at INFO on stdout (one stream, line-buffered, so `ray job submit` and a
    pipe show lines as they happen and in order); other loggers print WARNING and above, less
    KNOWN_NOISE. verbose=True keeps the quiet settings off: libraries log and draw bars as usual."""
    global _VERBOSE
    _VERBOSE = bool(verbose)
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass  # a replaced stdout (tests, notebooks) keeps its own buffering
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    logging.getLogger("raytrain").setLevel(logging.INFO)
    if _VERBOSE:
        root.setLevel(logging.INFO)
        return
    root.setLevel(logging.WARNING)
    handler.addFilter(NoiseFilter())
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def quiet_ray_loggers() -> None:
    """After Ray is imported and started: its loggers (own handlers, not propagating) at WARNING, and
    KNOWN_NOISE filtered from their handlers. A no-op with --verbose."""
    if verbose():
        return
    names = [n for n in list(logging.root.manager.loggerDict) if n == "ray" or n.startswith("ray.")]
    for name in names:
        lg = logging.getLogger(name)
        if name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
            lg.setLevel(logging.WARNING)
        for h in lg.handlers:
            if not any(isinstance(f, NoiseFilter) for f in h.filters):
                h.addFilter(NoiseFilter())


# ----------------------------------------------------------------------------------------------
# progress lines


def duration(seconds: float) -> str:
    """12s, 4m05s, 2h03m."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class TrainProgress:
    """raytrain's training progress: one line per report (every train.log_every steps, and with every
    validation), ETA from the steps per second seen by this process (a resumed run starts its clock
    at its first report)."""

    def __init__(self, total_steps: int, *, label: str = "train", clock: Callable[[], float] = time.monotonic):
        self.total, self.label, self.clock = total_steps, label, clock
        self.first: tuple[int, float] | None = None

    def line(self, metrics: dict) -> str:
        step = int(metrics.get("step", 0))
        now = self.clock()
        if self.first is None:
            self.first = (step, now)
        s0, t0 = self.first
        rate = (step - s0) / (now - t0) if step > s0 and now > t0 else float("nan")
        eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
        parts = [f"{self.label} step {step}/{self.total}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("ce", "ce {:.4f}"), ("lr", "lr {:.2e}"), ("samples_per_s", "{:.1f} samples/s")):
            if isinstance(metrics.get(key), (int, float)):
                parts.append(fmt.format(metrics[key]))
        parts += [f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("val_") and isinstance(v, (int, float))]
        parts.append(f"ETA {duration(eta)}")
        return " | ".join(parts)

    def __call__(self, metrics: dict) -> None:
        log.info("%s", self.line(metrics))


def progress(rows: Iterable, total: int, *, label: str, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> Iterator:
    """Yield `rows` unchanged, printing `label n/total (p%) r/s ETA` at most every `every_s` seconds
    and once at the end (a periodic line rather than a bar: it reads the same in a terminal, a pipe
    and `ray job submit`'s log)."""
    t0 = last = clock()
    n = 0
    for row in rows:
        n += 1
        yield row
        now = clock()
        if now - last >= every_s and n < total:
            last = now
            rate = n / max(now - t0, 1e-9)
            log.info("%s %d/%d (%d%%) %.1f/s ETA %s", label, n, total, 100 * n // max(total, 1), rate, duration((total - n) / rate))
    dt = clock() - t0
    log.info("%s %d/%d done in %s (%.1f/s)", label, n, total, duration(dt), n / max(dt, 1e-9))


# ----------------------------------------------------------------------------------------------
# training reports, as they happen, where fit() runs


def _forward_cls():
    # defined on first use: importing ray.train when this module loads would slow every command down
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        """Runs in Ray Train's controller: puts rank 0's metrics of every report on a Ray queue."""

        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            if metrics:
                row = dict(metrics[0])
                if checkpoint is not None:
                    row["checkpoint"] = checkpoint.path
                self.queue.put(row)

    return ForwardReports


class ReportStream:
    """Every training report, rank 0's metrics, handed to `sinks` in THIS process while fit() runs.

    Ray Train V2 runs its callbacks in the controller actor, whose output a quiet driver does not
    receive: the controller puts each report on a Ray queue (an actor reserving no CPU) and a thread
    here hands it to the sinks (TrainProgress, a tracker). A sink that raises is logged and skipped
    for that report; the training goes on.

        with ReportStream([TrainProgress(cfg.train.steps), tracker.log_report]) as stream:
            result = trainer_with(callbacks=[stream.callback(), ...]).fit()
    """

    def __init__(self, sinks: list[Callable[[dict], None]]):
        self.sinks = [s for s in sinks if s is not None]
        self._queue = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.delivered = 0

    def callback(self):
        """The Ray Train UserCallback that feeds this stream (pass it in RunConfig.callbacks)."""
        return _forward_cls()(self._queue)

    def __enter__(self) -> ReportStream:
        from ray.util.queue import Queue

        from raytrain.data.pipeline import on_this_node

        # on this process's node: a queue on a worker node would die with it, and the controller,
        # which reports into it, would fail the run instead of restoring it on the nodes left
        self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": on_this_node()})
        self._thread = threading.Thread(target=self._run, name="raytrain-reports", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        import ray

        try:
            ray.kill(self._queue.actor)
        except Exception:  # noqa: BLE001  already gone with the cluster
            pass

    def _deliver(self, row: dict) -> None:
        self.delivered += 1
        for sink in self.sinks:
            try:
                sink(row)
            except Exception as e:  # noqa: BLE001  a console or tracking failure must not stop training
                log.warning("report sink %s failed: %s", getattr(sink, "__qualname__", sink), e)

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                row = self._queue.get(block=True, timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return  # fit() has returned: every report was put before it did
                continue
            except Exception as e:  # noqa: BLE001  the queue actor died with the cluster
                log.warning("training reports stopped reaching the console: %s", e)
                return
            self._deliver(row)
