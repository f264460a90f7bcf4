"""Issue 14 item 7's training options, without a model: which steps validate and checkpoint when a
metric selects the checkpoint, which checkpoint is the run's result, what Ray Train is told to
keep, and the optimizers."""

import json

import pytest
import torch

from raytrain import config as config_mod
from raytrain.launch import eval as launch_eval
from raytrain.launch import job, trainer
from raytrain.training import loop, optim


def _cfg(tmp_path, *extra):
    return config_mod.load(None, [f"storage.root={tmp_path}", "name=sel", *extra])


def _checkpoint(cfg, n: int, step: int, metrics: dict | None, with_state: bool = True):
    d = job.runs_root(cfg) + f"/{cfg.name}/checkpoint_{n:06d}"
    import os

    os.makedirs(d)
    if with_state:
        with open(os.path.join(d, "state.json"), "w") as f:
            json.dump({"step": step, "metrics": metrics or {}}, f)
    return d


def test_selection_validates_and_keeps_every_checkpoint():
    plain = config_mod.TrainConfig(steps=10, val_every=4, checkpoint_every=3)
    sel = config_mod.TrainConfig(steps=10, val_every=4, checkpoint_every=3, select_checkpoint="val_loss")
    plain_due = {s: loop.due(plain, s, True) for s in range(1, 11)}
    sel_due = {s: loop.due(sel, s, True) for s in range(1, 11)}
    assert [s for s, d in plain_due.items() if d.validate] == [4, 8]
    assert [s for s, d in plain_due.items() if d.checkpoint] == [3, 6, 9, 10]
    # selecting: every checkpoint is validated (ranked by its own value), every validation checkpointed
    assert [s for s, d in sel_due.items() if d.validate] == [3, 4, 6, 8, 9, 10]
    assert [s for s, d in sel_due.items() if d.checkpoint] == [3, 4, 6, 8, 9, 10]


def test_the_run_result_is_the_checkpoint_the_selection_names(tmp_path):
    cfg = _cfg(tmp_path, "train.val_every=2")
    _checkpoint(cfg, 0, 2, {"val_loss": 3.0, "val_box_f1": 0.1})
    best_loss = _checkpoint(cfg, 1, 4, {"val_loss": 1.5, "val_box_f1": 0.2})
    best_f1 = _checkpoint(cfg, 2, 6, {"val_loss": 2.0, "val_box_f1": 0.6})
    _checkpoint(cfg, 3, 7, {"loss": 0.1})  # no validation recorded: never chosen by a metric
    last = _checkpoint(cfg, 4, 8, {"val_loss": 2.5, "val_box_f1": float("nan")})
    _checkpoint(cfg, 5, 9, None, with_state=False)  # an interrupted upload
    assert launch_eval.latest_checkpoint(cfg) == last
    by_loss = _cfg(tmp_path, "train.val_every=2", "train.select_checkpoint=val_loss")
    assert launch_eval.latest_checkpoint(by_loss) == best_loss
    choice = launch_eval.checkpoint_choice(by_loss)
    assert (choice["step"], choice["value"], choice["select_mode"]) == (4, 1.5, "min")
    by_f1 = _cfg(tmp_path, "train.val_every=2", "train.select_checkpoint=val_box_f1", "train.select_mode=max")
    assert launch_eval.latest_checkpoint(by_f1) == best_f1  # the NaN of step 8 never wins
    # min on a metric where larger is better picks the worst: the mode is the user's to set
    assert launch_eval.checkpoint_choice(_cfg(tmp_path, "train.val_every=2", "train.select_checkpoint=val_box_f1"))["step"] == 2
    with pytest.raises(FileNotFoundError, match="val_norm_distance_all"):
        launch_eval.latest_checkpoint(_cfg(tmp_path, "train.val_every=2", "train.select_checkpoint=val_norm_distance_all"))


def test_ray_train_keeps_the_best_by_the_selection_metric():
    keep = trainer.checkpoint_config(config_mod.load(None, ["train.keep_checkpoints=3"]))
    assert (keep.num_to_keep, keep.checkpoint_score_attribute) == (3, None)
    best = trainer.checkpoint_config(config_mod.load(None, ["train.val_every=5", "train.select_checkpoint=val_box_f1",
                                                            "train.select_mode=max"]))
    assert (best.checkpoint_score_attribute, best.checkpoint_score_order) == ("val_box_f1", "max")


def test_selection_and_splits_are_checked_against_validation_and_evaluation():
    with pytest.raises(ValueError, match="val_every"):
        config_mod.load(None, ["train.select_checkpoint=val_loss"])
    with pytest.raises(ValueError, match="not trained on"):
        config_mod.load(None, ["train.splits=[train, val]", "train.val_every=10"])
    with pytest.raises(ValueError, match="eval.split"):
        config_mod.load(None, ["train.splits=[train, test]"])
    with pytest.raises(ValueError, match="distinct"):
        config_mod.load(None, ["train.splits=[train, train]"])
    ok = config_mod.load(None, ["train.splits=[train, val]", "train.val_every=10", "train.val_split=dev"])
    assert ok.train.splits == ["train", "val"]


def test_sgd_and_adamw_betas():
    w = torch.nn.Parameter(torch.ones(3, 3))
    b = torch.nn.Parameter(torch.zeros(3))
    sgd = optim.build_optimizer([w, b], lr=0.03, weight_decay=0.1, name="sgd", momentum=0.9)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.9
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.1, 0.0]  # no decay on the 1-D bias
    (w.sum() + b.sum()).backward()
    sgd.step()
    assert torch.allclose(w, torch.full((3, 3), 1 - 0.03 * (1 + 0.1)))  # plain SGD step with decay
    adam = optim.build_optimizer([w], lr=1e-3, name="adamw", betas=[0.8, 0.95])
    assert adam.param_groups[0]["betas"] == (0.8, 0.95)
    with pytest.raises(ValueError, match="sgd"):
        optim.build_optimizer([w], lr=1e-3, name="lamb")


def test_float16_helpers():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).half()
    m[0].requires_grad_(False)
    assert optim.master_weights_fp32(m) == 2
    assert {p.dtype for p in m[0].parameters()} == {torch.float16} and {p.dtype for p in m[1].parameters()} == {torch.float32}
    cpu = torch.device("cpu")
    assert optim.grad_scaler("float16", cpu).is_enabled() and not optim.grad_scaler("bfloat16", cpu).is_enabled()
    with optim.autocast("float16", cpu):
        assert m(torch.randn(2, 4, dtype=torch.float16)).dtype == torch.float16  # fp16 and fp32 weights meet in fp16


def test_zero_recipes_take_float16_and_sgd():
    from raytrain.recipes import zero

    cfg = config_mod.load(None, ["train.strategy=zero2", "model.dtype=float16", "train.optimizer=sgd", "train.momentum=0.5"])
    conf = zero.ds_config(cfg)
    assert conf["fp16"]["enabled"] and conf["fp16"]["loss_scale"] == 0 and not conf["bf16"]["enabled"]  # 0: dynamic scaling
    assert not zero.ds_config(config_mod.load(None, ["train.strategy=zero2", "model.dtype=bfloat16"]))["fp16"]["enabled"]
    model = torch.nn.Linear(3, 3)
    opt = zero.build_optimizer(model, cfg)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.5
    with pytest.raises(ValueError, match="adamw"):
        zero.build_optimizer(model, config_mod.load(None, ["train.strategy=zero2", "train.optimizer=sgd", "zero.offload_optimizer=true"]))
