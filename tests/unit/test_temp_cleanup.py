"""Nothing raytrain puts in the temp dir outlives its user: each case runs with the temp dir
pointed at a fresh folder (tempfile.tempdir in this process, $TMPDIR in a child process for what is
removed at exit) and asserts that the folder is empty afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from raytrain import storage
from raytrain.eval import exports, streaming
from raytrain.training import checkpointing

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    """A fresh folder that `tempfile` (mkdtemp, TemporaryDirectory) uses in this test."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _child(code: str, tmpdir: Path) -> str:
    """Run `code` in a fresh interpreter with $TMPDIR = tmpdir (this worktree's raytrain); its stdout."""
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _s3_checkpoint(bucket: str, opts) -> str:
    uri = storage.join(bucket, "runs", "exp", "checkpoint_000003")
    storage.write_json(storage.join(uri, checkpointing.STATE_JSON), {"step": 3}, opts)
    storage.write_json(storage.join(uri, "adapter", "adapter_config.json"), {"r": 8}, opts)
    return uri


# ---------------------------------------------------------------------------- checkpoints from S3


def test_local_checkpoint_removes_the_s3_download_after_the_block_and_on_error(tmp, s3_bucket, s3_opts):
    uri = _s3_checkpoint(s3_bucket, s3_opts)
    with checkpointing.local_checkpoint(uri, s3_opts) as local:
        assert local.parent == tmp
        assert checkpointing.read_state(local)["step"] == 3
        assert json.loads((local / "adapter" / "adapter_config.json").read_text()) == {"r": 8}
    assert not list(tmp.iterdir())

    with pytest.raises(RuntimeError, match="boom"), checkpointing.local_checkpoint(uri, s3_opts) as local:
        assert local.is_dir()
        raise RuntimeError("boom")
    assert not list(tmp.iterdir())


def test_local_checkpoint_of_a_local_directory_is_that_directory_and_stays(tmp, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / checkpointing.STATE_JSON).write_text('{"step": 1}')
    with checkpointing.local_checkpoint(str(ckpt)) as local:
        assert local == ckpt
    assert (ckpt / checkpointing.STATE_JSON).exists() and not list(tmp.iterdir())


def test_local_copy_keeps_the_s3_download_for_the_process_and_removes_it_at_exit(tmp_path, s3_bucket, s3_opts):
    uri = _s3_checkpoint(s3_bucket, s3_opts)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = _child(
        "import gc, json\n"
        "from raytrain.storage import StorageOptions\n"
        "from raytrain.training import checkpointing\n"
        f"local = checkpointing.local_copy({uri!r}, StorageOptions(endpoint_url={s3_opts.endpoint_url!r}, region='us-east-1'))\n"
        "gc.collect()\n"  # the files stay while the process lives, whatever is collected
        "print(json.dumps({'dir': str(local), 'step': checkpointing.read_state(local)['step']}))\n", tmpdir)
    seen = json.loads(out.strip().splitlines()[-1])
    assert Path(seen["dir"]).parent == tmpdir and seen["step"] == 3
    assert not list(tmpdir.iterdir())


# ---------------------------------------------------------------------------- COCO spool


def _coco(tmp_path) -> exports.CocoFiles:
    return exports.CocoFiles(str(tmp_path / "out" / "gt.json"), str(tmp_path / "out" / "res.json"))


def test_coco_files_spool_is_removed_by_close(tmp, tmp_path):
    coco = _coco(tmp_path)
    assert len(list(tmp.iterdir())) == 1  # the spool
    coco.on_image({"id": 1, "file_name": "a", "width": 4, "height": 4})
    coco.on_annotation({"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0})
    coco.on_result({"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5})
    gt, _ = coco.close([{"id": 1, "name": "cat"}])
    assert json.loads(Path(gt).read_text())["images"][0]["file_name"] == "a"
    assert not list(tmp.iterdir())


def test_coco_files_spool_is_removed_when_close_fails(tmp, tmp_path):
    (tmp_path / "out").write_text("a file where the output folder should be")
    coco = _coco(tmp_path)
    with pytest.raises(OSError):
        coco.close([])
    assert not list(tmp.iterdir())


def test_coco_files_spool_is_removed_on_an_error_before_close(tmp, tmp_path):
    with pytest.raises(RuntimeError, match="boom"), _coco(tmp_path) as coco:
        coco.on_image({"id": 1})
        raise RuntimeError("boom")
    assert not list(tmp.iterdir())


def test_collect_removes_the_coco_spool_when_a_part_is_unreadable(tmp, tmp_path):
    part = tmp_path / "part-0.jsonl"
    part.write_text('{"id": "a", "task": "detect"\n')  # cut off mid-line
    with pytest.raises(json.JSONDecodeError):
        streaming.collect([str(part)], str(tmp_path / "eval"), "test", "model", main=True)
    assert not list(tmp.iterdir())


# ---------------------------------------------------------------------------- ZeRO's one-rank group


def test_the_one_rank_file_store_is_removed_at_exit(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    # left up (as after zero.train) and destroyed (as the tests do): gone at exit either way
    for destroy in (False, True):
        out = _child(
            "import os, tempfile, torch.distributed as dist\n"
            "from raytrain.recipes import zero\n"
            "zero.single_rank_group('gloo')\n"
            "dist.barrier()\n"
            f"print(os.listdir(tempfile.gettempdir()))\n"
            f"if {destroy}: dist.destroy_process_group()\n", tmpdir)
        assert "raytrain-pg-" in out
        assert not list(tmpdir.iterdir())


def test_until_exit_directories_of_a_forked_child_stay_for_the_parent(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = _child(
        "import os, sys\n"
        "from raytrain import tempdirs\n"
        "d = tempdirs.until_exit('raytrain-x-')\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.exit(0)\n"  # runs the inherited atexit handlers: they must leave the parent's directory
        "os.waitpid(pid, 0)\n"
        "print(d.is_dir())\n", tmpdir)
    assert out.strip() == "True"
    assert not list(tmpdir.iterdir())


def test_removing_the_last_universal_copy_removes_the_cache_root(tmp):
    from raytrain.training import zero_checkpoint

    a, b = (zero_checkpoint.universal_root(f"/ckpt/{n}", "global_step4") for n in ("a", "b"))
    for root in (a, b):
        (root / "global_step4_universal").mkdir(parents=True)
    assert a.parent == tmp / "raytrain-universal"
    zero_checkpoint.remove_universal(str(a))
    assert not a.exists() and b.is_dir()  # another run's copy stays, and the root with it
    zero_checkpoint.remove_universal(str(b))
    assert not list(tmp.iterdir())
