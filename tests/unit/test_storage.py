import dataclasses
import os
import pickle

import pyarrow.fs as pafs
import pytest

from raytrain import storage
from raytrain.storage import StorageOptions


def test_is_s3_and_strip_scheme(tmp_path):
    assert storage.is_s3("s3://bucket/a/b")
    assert not storage.is_s3("/data/x")
    assert not storage.is_s3("relative/x")
    assert storage.strip_scheme("s3://bucket/a/b/") == "bucket/a/b"
    assert storage.strip_scheme(str(tmp_path / "x")) == str(tmp_path / "x")
    assert os.path.isabs(storage.strip_scheme("relative/x"))


def test_join():
    assert storage.join("s3://bucket/root/", "train", "shard-00000.parquet") == "s3://bucket/root/train/shard-00000.parquet"
    assert storage.join("s3://bucket", "/a/", "b") == "s3://bucket/a/b"
    assert storage.join("/tmp/x", "train", "f.parquet") == os.path.join("/tmp/x", "train", "f.parquet")


def test_run_dir():
    assert storage.run_dir("s3://bucket/runs", "exp1") == "s3://bucket/runs/exp1"
    assert storage.run_dir("/ckpt", "exp1") == "/ckpt/exp1"
    for bad in ["", "a/b", ".."]:
        with pytest.raises(ValueError):
            storage.run_dir("/ckpt", bad)


def test_options_carry_no_credentials():
    # Credentials come from the AWS environment / instance role only, never from config.
    assert {f.name for f in dataclasses.fields(StorageOptions)} == {"endpoint_url", "region"}


def test_json_roundtrip_local(tmp_path):
    uri = str(tmp_path / "deep" / "dir" / "r.json")  # parents are created
    obj = {"a": 1, "b": [1.5, "x"], "c": {"d": None}}
    assert storage.write_json(uri, obj) == uri
    assert storage.read_json(uri) == obj
    assert storage.exists(uri)
    assert not storage.exists(str(tmp_path / "missing.json"))


def test_pyarrow_fs_local(tmp_path):
    fs, path = storage.pyarrow_fs(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path)


def test_pyarrow_fs_s3_endpoint_and_no_pickled_secrets(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEDONOTSHIP")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret-do-not-ship")
    fs, path = storage.pyarrow_fs("s3://bucket/data/", StorageOptions("http://127.0.0.1:9000", "eu-west-1"))
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/data"
    assert fs.region == "eu-west-1"
    kwargs = fs.__reduce__()[1][0]  # what Ray ships to workers when it pickles the filesystem
    assert kwargs["endpoint_override"] == "127.0.0.1:9000"
    assert kwargs["scheme"] == "http"
    blob = pickle.dumps(fs)
    assert b"DONOTSHIP" not in blob and b"do-not-ship" not in blob  # workers resolve their own


def test_fsspec_fs_s3_endpoint():
    fs = storage.fsspec_fs("s3://bucket", StorageOptions("http://127.0.0.1:9000"))
    assert fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9000"
    assert fs.client_kwargs["region_name"]


@pytest.mark.integration
def test_json_roundtrip_s3(s3_bucket, s3_opts):
    uri = storage.join(s3_bucket, "runs", "exp", "report.json")
    storage.write_json(uri, {"ok": True}, s3_opts)
    assert storage.exists(uri, s3_opts)
    assert storage.read_json(uri, s3_opts) == {"ok": True}
