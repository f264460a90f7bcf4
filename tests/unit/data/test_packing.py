"""Packing and the data position without models or Ray: which examples share a row, the row
layout both families build, example keys, the per-epoch filter, DataPosition's record and resume,
and native-resolution frames (Qwen2.5-VL's per-image size, min/max pixel bounds)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from raytrain import config as config_mod
from raytrain.data import packing, pipeline
from raytrain.formats import qwen as qfmt
from raytrain.models import family, qwen_batch
from raytrain.models._batch import join_images, restarting_positions
from raytrain.training import loop
from raytrain.training.session import Session


@pytest.mark.parametrize("seed", range(5))
def test_assign_rows_fits_every_example_once(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 60, size=rng.integers(1, 80))
    rows = packing.assign_rows(lengths, 64)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))  # every example, once
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    # first-fit decreasing needs at most 11/9 OPT + 6/9 rows; OPT >= total / capacity
    assert len(rows) <= 11 / 9 * np.ceil(lengths.sum() / 64) + 1
    assert packing.assign_rows(lengths, 64) == rows  # deterministic
    with pytest.raises(ValueError, match="does not fit"):
        packing.assign_rows([65], 64)


def test_restarting_positions_mark_every_boundary():
    pos = restarting_positions([3, 2], 8, start=1)
    assert pos.tolist() == [1, 2, 3, 1, 2, 1, 2, 3]  # the padding is a sequence of its own
    steps = np.diff(pos)
    assert (steps != 1).sum() == 2  # two boundaries: what transformers reads packing from


def _fake_examples(lengths, pixels=True):
    """Tokenized rows as PaliGemma's encode_train writes them (fixed length 16)."""
    n, t = len(lengths), 16
    out = {"input_ids": np.zeros((n, t), np.int32), "attention_mask": np.zeros((n, t), np.int8),
           "token_type_ids": np.zeros((n, t), np.int8), "labels": np.full((n, t), -100, np.int32),
           "pixel_values": np.zeros((n, 3, 4, 4), np.uint8), "pixel_scale": np.ones((n, 3), np.float32),
           "pixel_offset": np.zeros((n, 3), np.float32), "example_keys": np.arange(100, 100 + n, dtype=np.int64)[:, None]}
    for i, m in enumerate(lengths):
        out["input_ids"][i, :m] = np.arange(1, m + 1) + 10 * i
        out["attention_mask"][i, :m] = 1
        out["token_type_ids"][i, m - 2:m] = 1
        out["labels"][i, m - 2:m] = 7
        out["pixel_values"][i] = i
    return out


def test_paligemma_rows_concatenate_examples_with_their_own_positions():
    enc = _fake_examples([5, 9, 4, 7])
    rows = packing.pack_batch(enc, family="paligemma", length=16, pad_id=0)
    assert rows["input_ids"].shape == (len(rows["position_ids"]), 16)
    keys = [list(k) for k in rows["example_keys"]]
    assert sorted(k for r in keys for k in r) == [100, 101, 102, 103]
    for r, ks in enumerate(keys):
        idx = [k - 100 for k in ks]
        lengths = [int(enc["attention_mask"][i].sum()) for i in idx]
        want_ids = np.concatenate([enc["input_ids"][i, :n] for i, n in zip(idx, lengths)])
        assert rows["input_ids"][r, :len(want_ids)].tolist() == want_ids.tolist()
        assert rows["position_ids"][r].tolist() == restarting_positions(lengths, 16, start=1).tolist()
        assert int(rows["attention_mask"][r].sum()) == sum(lengths)
        assert (rows["labels"][r, sum(lengths):] == -100).all()
        # images in the order of their examples: the order the model fills placeholders in
        assert [int(np.asarray(rows["pixel_values"][r])[j].max()) for j in range(len(idx))] == idx


def test_join_images_reads_every_layout_ray_hands_over():
    a, b = np.ones((2, 3, 4, 4)), np.zeros((1, 3, 4, 4))
    assert join_images([a, b], 4).shape == (3, 3, 4, 4)  # ragged rows (a list)
    assert join_images(np.stack([a, a]), 4).shape == (4, 3, 4, 4)  # equal rows (one array)
    assert join_images(a, 4) is a  # already flat
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = a, b
    assert join_images(obj, 4).shape == (3, 3, 4, 4)


def test_example_keys_are_stable_and_distinct():
    k = pipeline.example_keys(["a", "a", "b"], ["point", "detect", "point"], ["cat", "cat", "cat"])
    assert len(set(k.tolist())) == 3 and k.dtype == np.int64
    assert (pipeline.example_keys(["a"], ["point"], ["cat"]) == k[:1]).all()  # no per-process salt


def test_drop_trained_keeps_the_rest():
    enc = _fake_examples([5, 9, 4, 7])
    kept = packing.drop_trained(enc, np.array([101, 103]))
    assert kept["example_keys"].ravel().tolist() == [100, 102]
    assert kept["input_ids"][1].tolist() == enc["input_ids"][2].tolist()
    assert packing.drop_trained(enc, np.zeros(0, np.int64)) is enc


# ---------------------------------------------------------------------------- the data position


def _batch(keys):
    return {"x": np.zeros(len(keys)), "example_keys": [np.asarray(k) for k in keys]}


def test_position_records_keys_and_resumes_by_keys_or_by_count(tmp_path):
    batches = [_batch([[1, 2], [3]]), _batch([[4], [5, 6]]), _batch([[7], [8]])]
    filtered = {}

    def session(resume_by_keys: bool, rank: int = 0):
        def resume(epoch, keys):
            filtered[epoch] = sorted(keys.tolist())
            return resume_by_keys
        return Session(rank=rank, world_size=1, checkpoint_dir=lambda: None, report=lambda m, d: None,
                       epoch_batches=lambda e, m: [dict(b) for b in batches], resume_data=resume)

    pos = loop.DataPosition(session(False), micro=2)
    it = pos.batches()
    first = [next(it) for _ in range(2)]
    assert "example_keys" not in first[0][2] and pos.examples == 6
    snap = pos.snapshot()
    assert (snap["epoch"], snap["batch_in_epoch"], snap["samples_in_epoch"]) == (0, 2, 6)
    assert sorted(snap["keys"].tolist()) == [1, 2, 3, 4, 5, 6]
    state = loop.checkpoint_state(config_mod.load(None), step=1, metrics={}, position=snap)
    assert state["data_keys"] == loop.POSITION_FILE and state["samples_in_epoch"] == 6
    loop.save_position(tmp_path, snap)

    # a runner that filters by keys: told the keys, skips nothing, records restored + new keys
    by_keys = loop.DataPosition.restore(session(True), 2, state, tmp_path)
    assert filtered[0] == [1, 2, 3, 4, 5, 6] and by_keys.skip == 0
    # a runner that cannot: skips the checkpoint's batch count
    by_count = loop.DataPosition.restore(session(False), 2, state, tmp_path)
    (epoch, n, b), = [next(by_count.batches())]
    assert (epoch, n) == (0, 3) and b["x"].shape == (2,)
    assert sorted(by_count.snapshot()["keys"].tolist()) == [1, 2, 3, 4, 5, 6, 7, 8]
    # a rank other than 0 does not carry the restored keys (gathering would count them twice)
    other = loop.DataPosition.restore(session(True, rank=1), 2, state, tmp_path)
    assert other.snapshot()["keys"].tolist() == []


def test_resumed_epoch_may_be_empty_but_a_fresh_one_may_not():
    calls = []

    def epoch_batches(epoch, micro):
        calls.append(epoch)
        return [] if epoch == 0 else [_batch([[epoch]])]

    s = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=lambda m, d: None, epoch_batches=epoch_batches)
    resumed = loop.DataPosition(s, 1, epoch=0, skip=0, keys=np.array([5]))  # every example of epoch 0 was trained
    assert next(resumed.batches())[0] == 1
    with pytest.raises(RuntimeError, match="no batches"):
        next(loop.micro_batches(s, 1, epoch=0))


# ---------------------------------------------------------------------------- native frames


def test_native_frame_sizes_each_image_and_takes_pixel_bounds():
    settings = {"factor": 28, "min_pixels": 3136, "max_pixels": 12845056}
    frame = qwen_batch.native_frame(settings)
    assert qwen_batch.input_size(frame, 640, 480) == qfmt.smart_resize(480, 640, 28, 3136, 12845056) == (476, 644)
    small = qwen_batch.native_frame(settings, max_pixels=200704)  # 256 image tokens at most
    h, w = qwen_batch.input_size(small, 640, 480)
    assert h * w <= 200704 and h % 28 == 0 and w % 28 == 0 and abs(w / h - 640 / 480) < 0.1
    assert qwen_batch.input_size((112, 112), 640, 480) == (112, 112)  # a fixed frame
    with pytest.raises(ValueError, match="min_pixels"):
        qwen_batch.native_frame(settings, min_pixels=300000, max_pixels=200704)
    fam = family("qwen2_5_vl")
    assert fam.RESIZE_MODES[0] == "native" and family("paligemma").RESIZE_MODES == ("stretch", "letterbox")
    with pytest.raises(ValueError, match="fixed"):
        family("paligemma").input_size({"native": settings}, 10, 10)


def test_preprocess_pixel_bounds_are_native_only():
    cfg = config_mod.load(None, ["model.family=qwen2_5_vl", "data.preprocess.max_pixels=200704"])
    assert cfg.data.preprocess.max_pixels == 200704 and cfg.data.preprocess.resize == "native"
    with pytest.raises(ValueError, match="resize=native"):
        config_mod.load(None, ["data.preprocess.max_pixels=200704"])  # PaliGemma: stretch
    with pytest.raises(ValueError, match="min_pixels"):
        config_mod.Preprocess("native", min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError, match="data.packing"):
        config_mod.load(None, ["data.packing=20", "data.max_seq_len=48"])


def test_loop_batches_without_keys_still_work():
    s = Session(rank=0, world_size=1, checkpoint_dir=lambda: None, report=lambda m, d: None,
                epoch_batches=lambda e, m: [{"x": np.zeros(2)}])
    pos = loop.DataPosition(s, 2)
    with contextlib.closing(pos.batches()) as it:
        assert next(it)[1] == 1
    snap = pos.snapshot()
    assert snap["keys"] is None and snap["samples_in_epoch"] == 2
