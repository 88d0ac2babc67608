"""Long runs through the CLI, one process each (``dsq train`` on configs/tiny.yaml): a resume
whose changed settings take effect, checkpoints whose markers list exactly their files, a
damaged older checkpoint moved aside, and a diverged run that stops with exit 1 and one line
before it writes or prunes any checkpoint (issue "Long runs", items 1-3)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dsq.config import load_config
from dsq.run import checkpoint
from dsq.train.schedule import lr_lambda

from tests.conftest import dsq, read_metrics

pytestmark = pytest.mark.slow

COMMON = ["train.eval_every=0", "train.eval_samples=16", "train.progress=false",
          "tracking.enabled=false"]
FIRST = ["train.steps=4", "train.ckpt_every=2", "optim.warmup_steps=2", "optim.lr=2e-3"]
# the resume: every changed key has a test below
CHANGED = {"optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.warmup_steps": 3, "train.steps": 8,
           "optim.weight_decay": 0.05, "optim.beta1": 0.8, "optim.beta2": 0.99,
           "optim.eps": 1e-6, "optim.grad_clip": 0.5, "train.eval_every": 3,
           "train.ckpt_every": 3, "train.keep_ckpts": 3, "train.log_every": 2,
           "train.progress": True, "optim.schedule": "linear"}


def _args(out, cache, *extra):
    return ["configs/tiny.yaml", *COMMON, f"train.out_dir={out}", f"data.cache_dir={cache}",
            *extra]


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data_cache):
    """4 steps, then the same run resumed to 8 with every setting of CHANGED changed."""
    out = tmp_path_factory.mktemp("resume") / "run"
    first = _args(out, data_cache, *FIRST)
    dsq("train", *first)
    res = dsq("train", *first, *[f"{k}={v}" for k, v in CHANGED.items()])
    cfg = lambda *o: load_config(["configs/tiny.yaml"], [*COMMON, *FIRST, *o])
    return {"out": out, "res": res, "old": cfg(),
            "new": cfg(*[f"{k}={v}" for k, v in CHANGED.items()]),
            "optim": torch.load(out / "checkpoints" / checkpoint.tag_for(8) /
                                "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                map_location="cpu", weights_only=False)}


def _lrs(cfg, steps):
    fn = lr_lambda(cfg.optim, cfg.train.steps)
    return {s: cfg.optim.lr * fn(s) for s in steps}


@pytest.mark.parametrize("key", ["optim.lr", "optim.min_lr", "optim.warmup_steps",
                                 "train.steps", "optim.schedule"])
def test_changed_schedule_key_shows_in_train_lr(resumed, key):
    said = [ln for ln in resumed["res"].stdout.splitlines() if "with changed settings:" in ln]
    assert len(said) == 1 and f" {key} " in said[0]
    got = read_metrics(resumed["out"], "train/lr")
    assert {s: got[s] for s in (1, 2, 3, 4)} == pytest.approx(_lrs(resumed["old"], (1, 2, 3, 4)),
                                                              rel=1e-12)
    want = _lrs(resumed["new"], range(5, 9))
    assert {s: got[s] for s in range(5, 9)} == pytest.approx(want, rel=1e-12)
    # without this key's change the learning rates would differ
    reverted = load_config(["configs/tiny.yaml"], [
        *COMMON, *FIRST, *[f"{k}={v}" for k, v in CHANGED.items() if k != key]])
    assert _lrs(reverted, range(5, 9)) != pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("key", ["optim.weight_decay", "optim.beta1", "optim.beta2",
                                 "optim.eps", "optim.lr"])
def test_changed_optimizer_key_is_in_the_optimizer(resumed, key):
    """The resumed run's own checkpoint holds the optimizer's param groups as it used them."""
    from deepspeed.checkpoint import constants as C

    groups = resumed["optim"][C.OPTIMIZER_STATE_DICT][C.BASE_OPTIMIZER_STATE]["param_groups"]
    value = {"optim.weight_decay": lambda g: g["weight_decay"],
             "optim.beta1": lambda g: g["betas"][0], "optim.beta2": lambda g: g["betas"][1],
             "optim.eps": lambda g: g["eps"], "optim.lr": lambda g: g["initial_lr"]}[key]
    decayed = [g for g in groups if g["weight_decay"] != 0.0]
    assert decayed and all(value(g) == CHANGED[key] for g in
                           (decayed if key == "optim.weight_decay" else groups)), groups


def test_changed_grad_clip_is_in_the_zero_optimizer(resumed):
    from deepspeed.checkpoint import constants as C

    assert resumed["optim"][C.OPTIMIZER_STATE_DICT][C.CLIP_GRAD] == CHANGED["optim.grad_clip"]


def test_changed_cadences_take_effect(resumed):
    out = resumed["out"]
    assert sorted(read_metrics(out, "val/loss")) == [4, 6, 8]  # eval_every 0 -> 3 (and the end)
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    # ckpt_every 2 -> 3, keep_ckpts 2 -> 3: 4 (the first run's last) 6 and 8
    assert tags == [checkpoint.tag_for(s) for s in (4, 6, 8)]
    lines = [ln for ln in resumed["res"].stderr.splitlines() if ln.startswith("step ")]
    # progress on, log_every 2: the first step of the resumed run, every second, the last
    assert [ln.split()[1] for ln in lines] == ["5/8", "6/8", "8/8"]


def test_every_checkpoint_is_complete_and_its_marker_lists_exactly_its_files(resumed):
    root = resumed["out"] / "checkpoints"
    losses = read_metrics(resumed["out"])
    for tag in sorted(p for p in root.iterdir() if p.is_dir()):
        marker = _strict((tag / checkpoint.MARKER).read_text())
        files = {str(p.relative_to(tag)) for p in tag.rglob("*") if p.is_file()}
        assert files - {checkpoint.MARKER} == set(marker["files"]), tag.name
        assert {"tokenizer.model", "config.yaml", "rng_rank00000.pt",
                "mp_rank_00_model_states.pt",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(marker["files"])
        assert set(marker["sha256"]) == {"tokenizer.model", "config.yaml"}
        assert (tag / "tokenizer.model").read_bytes() == \
            (resumed["out"] / "tokenizer.model").read_bytes()
        assert marker["finite"] is True and marker["loss"] == losses[marker["step"]]
        assert checkpoint.check(tag) is None
    summary = _strict((resumed["out"] / "summary.json").read_text())
    assert summary["final_step"] == 8 and summary["nonfinite_steps"] == 0 == \
        summary["skipped_steps"]
    metrics = [json.loads(ln) for ln in
               (resumed["out"] / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/skipped_steps"] == 0 for r in metrics if "train/loss" in r)


def test_a_damaged_older_checkpoint_is_moved_aside_by_the_next_run(resumed, tmp_path):
    """The same tokenizer size with other bytes (the size check alone misses it); the repair
    a rerun does first (checkpoint.find_resume with repair, as rundir.claim calls it)."""
    root = tmp_path / "checkpoints"
    shutil.copytree(resumed["out"] / "checkpoints", root)
    tok = root / checkpoint.tag_for(4) / "tokenizer.model"
    data = bytearray(tok.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tok.write_bytes(bytes(data))
    said = []
    assert checkpoint.find_resume(root, repair=True, warn=said.append) == checkpoint.tag_for(8)
    assert len(said) == 1 and "SHA-256" in said[0] and "moved aside" in said[0]
    names = {p.name for p in root.iterdir() if p.is_dir()}
    aside = {n for n in names if n.startswith(checkpoint.tag_for(4) + ".invalid-")}
    assert len(aside) == 1 and names - aside == {checkpoint.tag_for(6), checkpoint.tag_for(8)}
    assert (root / "latest").read_text() == checkpoint.tag_for(8)


def test_a_diverged_run_stops_before_it_checkpoints_or_prunes(resumed, tmp_path, data_cache):
    """The finished run (a copy) resumed to train on with a learning rate far too high: the
    steps go bad; after train.max_skipped_steps of them in a row it stops with exit 1 and one
    error line, before checkpointing them (train.ckpt_every=2) or pruning (keep_ckpts=1):
    checkpoint 8 is still the latest, complete and finite."""
    out = tmp_path / "run"
    shutil.copytree(resumed["out"], out, ignore=shutil.ignore_patterns(".dsq.lock",
                                                                        "summary.json"))
    res = dsq("train", *_args(out, data_cache, *FIRST), "train.steps=40", "optim.lr=1e4",
              "train.ckpt_every=2", "train.keep_ckpts=1", "train.max_skipped_steps=3",
              check=False)
    assert res.returncode == 1, res.stderr[-3000:]
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("dsq: error:")]
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "training diverged at step" in err[0] and "a lower optim.lr (now 10000)" in err[0]
    stopped = int(err[0].split("training diverged at step ")[1].split(":")[0])
    assert 11 <= stopped < 40
    warned = [ln for ln in res.stderr.splitlines() if ln.startswith("dsq: warning: step ")]
    assert len(warned) >= 3
    root = out / "checkpoints"
    tags = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert tags == [checkpoint.tag_for(s) for s in (4, 6, 8)], tags
    assert (root / "latest").read_text() == checkpoint.tag_for(8)
    assert checkpoint.check(root / checkpoint.tag_for(8)) is None
    assert _strict((root / checkpoint.tag_for(8) / checkpoint.MARKER).read_text())["finite"]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == stopped
    assert rows[-1]["train/skipped_steps"] + rows[-1]["train/nonfinite_steps"] >= 3
    assert not (out / "summary.json").exists()
