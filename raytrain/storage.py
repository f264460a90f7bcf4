"""Storage URIs: a local path or ``s3://bucket/prefix``, and filesystem handles for them.

Credentials never pass through this module: s3fs, pyarrow and boto all read the standard
AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``)
or the instance role. Only the endpoint (for MinIO / moto / other S3-compatible stores) and the
region are configurable, so nothing secret ever lands in a config file, a report or a log line.

Two handles exist for the same URI:

* :func:`fsspec_fs` (s3fs) for writing (shards, JSON reports), listings, existence checks.
* :func:`pyarrow_fs` (pyarrow's native ``S3FileSystem``) for reading Parquet shards, with
  ``pyarrow.parquet`` or ``ray.data.read_parquet(paths, filesystem=fs)``.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import fsspec
from fsspec.implementations.local import LocalFileSystem

S3_SCHEME = "s3://"

# Environment for talking to an S3 server on loopback (moto in the tests, the benchmarks and
# ops/local_s3.py): public fake credentials in the standard variables the real clients read, and
# nothing that could reach AWS (no profile, no metadata endpoint, no proxy for loopback).
LOOPBACK_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
# ... and unset: a developer's session token, profile or endpoint override would win over the above.
LOOPBACK_S3_ENV_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass
class StorageOptions:
    """Where S3 lives. Leave both ``None`` for AWS itself with the default region chain."""

    endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. ``http://127.0.0.1:9000`` (moto / MinIO). ``None`` = AWS."""
    region: str | None = None
    """Bucket region; ``None`` = ``AWS_DEFAULT_REGION`` / ``AWS_REGION`` / ``us-east-1``."""


def _opts(opts: StorageOptions | None) -> StorageOptions:
    return opts if opts is not None else StorageOptions()


def _region(opts: StorageOptions) -> str:
    # Resolve the region here rather than letting the SDKs guess: a guess may query the EC2
    # metadata endpoint, which hangs for seconds off EC2.
    return opts.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def is_s3(uri: str) -> bool:
    """True for ``s3://bucket[/key]`` URIs, False for local paths."""
    return str(uri).startswith(S3_SCHEME)


def strip_scheme(uri: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key``; local paths become absolute paths."""
    if is_s3(uri):
        return str(uri)[len(S3_SCHEME):].rstrip("/")
    return os.path.abspath(os.path.expanduser(str(uri)))


def fsspec_fs(uri: str, opts: StorageOptions | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``uri``: s3fs for ``s3://``, the local filesystem otherwise."""
    if not is_s3(uri):
        return LocalFileSystem(auto_mkdir=True)
    import s3fs

    opts = _opts(opts)
    client_kwargs: dict[str, Any] = {"region_name": _region(opts)}
    if opts.endpoint_url:
        client_kwargs["endpoint_url"] = opts.endpoint_url
    # No listings cache: shards and reports are written by other processes (Ray workers, a
    # previous run), and a stale cached listing would hide them.
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False)


def pyarrow_fs(uri: str, opts: StorageOptions | None = None):
    """``(pyarrow.fs.FileSystem, path_without_scheme)`` for ``uri``.

    S3 uses pyarrow's native ``S3FileSystem`` (AWS C++ SDK) rather than s3fs wrapped in
    ``PyFileSystem(FSSpecHandler(...))``. Both read Parquet through Ray Data against moto on
    loopback; the native one is the one tested (tests/integration/test_shards_s3.py) because it
    pickles as plain options without credentials (each Ray worker resolves its own from its
    environment / instance role) and keeps the Python handler out of the read path.
    An ``http://`` endpoint needs ``scheme="http"``, or the SDK tries TLS on a plain-HTTP port.

    Writing large objects with it needs a server that answers ``CompleteMultipartUpload`` the
    way AWS does; moto 5.2.1 does not (getmoto/moto#10055), which is why
    ``raytrain.data.shards`` writes through :func:`fsspec_fs`.
    """
    import pyarrow.fs as pafs

    path = strip_scheme(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), path
    opts = _opts(opts)
    # allow_delayed_open: small objects (< one 10 MiB part) go up as a single PutObject
    # instead of a multipart upload (fewer requests; and moto 5.2.1 answers
    # CompleteMultipartUpload with a root tag pyarrow rejects, getmoto/moto#10055).
    kwargs: dict[str, Any] = {"region": _region(opts), "allow_delayed_open": True}
    if opts.endpoint_url:
        parsed = urlparse(opts.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs), path


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI with ``/`` for S3 and ``os.path.join`` locally."""
    parts = tuple(str(p).strip("/") if is_s3(uri) else str(p) for p in parts)
    if is_s3(uri):
        return posixpath.join(str(uri).rstrip("/"), *parts)
    return os.path.join(str(uri), *parts)


def exists(uri: str, opts: StorageOptions | None = None) -> bool:
    return fsspec_fs(uri, opts).exists(strip_scheme(uri))


def read_json(uri: str, opts: StorageOptions | None = None) -> Any:
    """Load a JSON document from a local path or S3 object."""
    with fsspec_fs(uri, opts).open(strip_scheme(uri), "r", encoding="utf-8") as f:
        return json.load(f)


def write_json(uri: str, obj: Any, opts: StorageOptions | None = None) -> str:
    """Write ``obj`` as indented JSON (creating parent dirs locally); returns ``uri``."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    with fsspec_fs(uri, opts).open(strip_scheme(uri), "w", encoding="utf-8") as f:
        f.write(text)
    return uri


def run_dir(root_uri: str, name: str) -> str:
    """Directory of one run: ``<root_uri>/<name>``.

    Same layout as Ray Train's ``RunConfig(storage_path=root_uri, name=name)``, so Ray's own
    checkpoints and our reports end up side by side.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"run name must be a single non-empty path segment, got {name!r}")
    return join(root_uri, name)
