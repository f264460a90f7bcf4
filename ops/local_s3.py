#!/usr/bin/env python
"""Start / stop a local S3 (moto server) on 127.0.0.1, for trying raytrain's s3:// paths offline.

    python ops/local_s3.py start --port 9000 --data .local_s3 [--bucket raytrain]
    python ops/local_s3.py status --data .local_s3
    python ops/local_s3.py stop --data .local_s3

``--data`` is the state folder: pid file, endpoint file and server log. moto keeps objects in
memory, so the bucket contents are gone after ``stop``. ``start`` prints the endpoint and the
fake credentials to export; give the endpoint to raytrain as ``StorageOptions(endpoint_url=...)``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from raytrain.storage import LOOPBACK_S3_ENV

HOST = "127.0.0.1"  # never bind anything else: the fake credentials are public
# the fake credentials tests and benchmarks use too (what a client must export to reach this server)
FAKE_ENV = {k: LOOPBACK_S3_ENV[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}


def _files(data: Path) -> tuple[Path, Path, Path]:
    return data / "local_s3.pid", data / "local_s3.endpoint", data / "local_s3.log"


def _running_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is alive and still a moto server, else None."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path("/proc").exists() else b"moto"
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid if b"moto" in cmdline else None  # a recycled pid belongs to someone else


def _wait_ready(endpoint: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            # moto answers its own dashboard path without credentials
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except OSError:
            time.sleep(0.2)
    return False


def start(port: int, data: Path, buckets: list[str], timeout_s: float) -> int:
    data.mkdir(parents=True, exist_ok=True)
    pid_file, endpoint_file, log_file = _files(data)
    endpoint = f"http://{HOST}:{port}"
    if (pid := _running_pid(pid_file)) is not None:
        print(f"already running (pid {pid}): {endpoint_file.read_text().strip()}", file=sys.stderr)
        return 1
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives this shell; stopped only through `stop`
            # no proxy may intercept loopback traffic
            env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"},
        )
    pid_file.write_text(f"{proc.pid}\n")
    endpoint_file.write_text(endpoint + "\n")
    if not _wait_ready(endpoint, timeout_s) or proc.poll() is not None:
        print(f"moto server did not come up on {endpoint}; see {log_file}", file=sys.stderr)
        _stop_pid(proc.pid)
        pid_file.unlink(missing_ok=True)
        return 1
    if buckets:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=FAKE_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=FAKE_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_ENV["AWS_SECRET_ACCESS_KEY"],
        )
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
    print(endpoint)
    print(f"# pid {proc.pid}; log {log_file}; buckets: {', '.join(buckets) or '(none)'}", file=sys.stderr)
    print("# export " + " ".join(f"{k}={v}" for k, v in FAKE_ENV.items()), file=sys.stderr)
    return 0


def _stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def stop(data: Path) -> int:
    pid_file, endpoint_file, _ = _files(data)
    pid = _running_pid(pid_file)
    if pid is None:
        print("not running", file=sys.stderr)
    else:
        _stop_pid(pid)
        print(f"stopped pid {pid}", file=sys.stderr)
    pid_file.unlink(missing_ok=True)
    endpoint_file.unlink(missing_ok=True)
    return 0


def status(data: Path) -> int:
    pid_file, endpoint_file, _ = _files(data)
    pid = _running_pid(pid_file)
    if pid is None:
        print("not running", file=sys.stderr)
        return 1
    print(endpoint_file.read_text().strip())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start moto on 127.0.0.1 and print its endpoint")
    s.add_argument("--port", type=int, default=9000)
    s.add_argument("--data", type=Path, default=Path(".local_s3"), help="state folder (pid, endpoint, log)")
    s.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server")
    for name in ("stop", "status"):
        q = sub.add_parser(name)
        q.add_argument("--data", type=Path, default=Path(".local_s3"))
    args = p.parse_args(argv)
    if args.cmd == "start":
        return start(args.port, args.data, args.bucket, args.timeout)
    if args.cmd == "stop":
        return stop(args.data)
    return status(args.data)


if __name__ == "__main__":
    sys.exit(main())
