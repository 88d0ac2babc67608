"""Every shipped config loads; bad configs fail with one message naming the key and the fix."""

from pathlib import Path

import pytest

from dsq.config import PRESETS, ConfigError, load_config, to_yaml

from tests.conftest import ROOT, dsq, launch

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {"tiny.yaml", "small.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_loads(path):
    base = [] if path.name in ("tiny.yaml", "small.yaml") else [str(ROOT / "configs/tiny.yaml")]
    cfg = load_config(base + [str(path)], world_size=2)
    assert cfg.model.hidden_size % cfg.model.num_heads == 0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_fill_model(preset):
    cfg = load_config([], [f"model.preset={preset}"])
    for k, v in PRESETS[preset].items():
        assert getattr(cfg.model, k) == v


def test_param_counts_of_presets():
    # analytic GPT parameter count (megatron layout: biases on every linear, LayerNorm w+b)
    def count(m):
        h, f, v, s, n = m.hidden_size, m.ffn_hidden_size, m.vocab_size, m.seq_len, m.num_layers
        layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        head = 0 if m.tie_embeddings else v * h
        return v * h + s * h + n * layer + 2 * h + head

    assert 8e6 < count(load_config([], ["model.preset=small"]).model) < 12e6
    assert 120e6 < count(load_config([], ["model.preset=gpt2-small"]).model) < 130e6
    assert 340e6 < count(load_config([], ["model.preset=gpt2-medium"]).model) < 360e6


def test_param_counts_of_llama_presets():
    # analytic Llama count: RMSNorm (weight only), GQA's QKV, SwiGLU (gate, up, down), no
    # biases, no position embeddings, untied head
    def count(m):
        h, f, v, n = m.hidden_size, m.ffn_hidden_size, m.vocab_size, m.num_layers
        hd, g = h // m.num_heads, m.num_query_groups
        layer = 2 * h + h * (h + 2 * g * hd) + h * h + 3 * h * f
        return v * h + n * layer + h + (0 if m.tie_embeddings else v * h)

    def of(preset):
        return count(load_config([], [f"model.preset={preset}"]).model)

    assert abs(of("llama-tiny") - 0.92e6) < 0.05e6  # as tiny (~0.92M)
    assert 8e6 < of("llama-small") < 10e6  # as small
    assert 140e6 < of("llama-150m") < 160e6
    assert 1.05e9 < of("llama-1b") < 1.15e9  # TinyLlama: 1.1B


def test_arch_fills_the_switches_left_unset():
    m = load_config([], ["model.preset=llama-tiny"]).model
    assert (m.arch, m.norm, m.mlp, m.positions, m.bias) == ("llama", "rmsnorm", "swiglu",
                                                           "rope", False)
    assert (m.num_query_groups, m.rope_base, m.norm_eps) == (2, 10000.0, 1e-5)
    m = load_config([str(ROOT / "configs/tiny.yaml")]).model
    assert (m.arch, m.norm, m.mlp, m.positions, m.bias, m.num_query_groups) == (
        "gpt2", "layernorm", "gelu", "learned", True, None)
    # a switch set explicitly wins over the arch, the arch set explicitly over the preset's
    m = load_config([], ["model.preset=llama-tiny", "model.mlp=gelu", "model.bias=true"]).model
    assert (m.norm, m.mlp, m.bias) == ("rmsnorm", "gelu", True)
    m = load_config([], ["model.arch=llama"]).model
    assert (m.hidden_size, m.norm, m.positions) == (128, "rmsnorm", "rope")
    assert load_config([], ["model.preset=llama-1b", "parallel.tp=4", "train.micro_batch=1",
                            "train.global_batch=64"], world_size=32).model.num_query_groups == 4


def test_layering_order(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train: {steps: 10, seed: 1}\n")
    b.write_text("train: {steps: 20}\n")
    cfg = load_config([str(ROOT / "configs/tiny.yaml"), str(a), str(b)], ["train.seed=7"])
    assert (cfg.train.steps, cfg.train.seed) == (20, 7)
    assert cfg.model.hidden_size == PRESETS["tiny"]["hidden_size"]
    # explicit fields win over the preset
    cfg = load_config([], ["model.preset=small", "model.num_layers=3"])
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 256
    assert "preset: small" in to_yaml(cfg)


@pytest.mark.parametrize("overrides, world, key", [
    (["train.stepz=3"], None, "train.stepz"),
    (["train.steps=many"], None, "train.steps"),
    (["model.num_heads=3"], None, "model.num_heads"),
    (["parallel.tp=3", "model.num_heads=6", "model.hidden_size=96",
      "model.ffn_hidden_size=384", "model.vocab_size=2050"], None, "model.vocab_size"),
    (["parallel.tp=8"], None, "parallel.tp"),
    (["parallel.tp=2"], 3, "parallel.tp"),
    (["train.global_batch=12", "train.micro_batch=8"], None, "train.global_batch"),
    (["train.global_batch=8", "train.micro_batch=8"], 2, "train.global_batch"),
    (["deepspeed.zero_stage=3"], None, "deepspeed.zero_stage"),
    (["deepspeed.precision=fp16"], None, "deepspeed.precision"),
    (["deepspeed.precision=bf16", "deepspeed.zero_stage=0"], None, "deepspeed.zero_stage"),
    (["model.preset=huge"], None, "model.preset"),
    (["quant.grad_gemms=sideways"], None, "quant.grad_gemms"),
    (["optim.name=qadamw", "optim.m_bits=16"], None, "optim.m_bits"),
    (["optim.name=qadamw", "optim.v_bits=2"], None, "optim.v_bits"),
    (["optim.name=qadamw", "optim.m_bits=32", "optim.v_bits=32"], None, "optim.name=adamw"),
    (["optim.name=qadamw", "optim.v_bits=32", "optim.v_domain=sqrt"], None,
     "optim.v_domain=linear"),
    (["optim.name=qadamw", "optim.block_size=32768"], None, "optim.block_size"),
    (["optim.name=qadamw", "optim.block_size=wide"], None, "optim.block_size"),
    (["optim.name=qadamw", "optim.quantize=some"], None, "optim.quantize"),
    (["optim.name=qadamw", "optim.kernel=fast"], None, "optim.kernel"),
    (["train.reshard=maybe"], None, "train.reshard"),
    (["train.recompute=partial"], None, "train.recompute='partial' is unknown: use none, "
                                         "selective or full"),
    (["quant.compute=int4"], None, "quant.compute"),
    (["model.arch=bert"], None, "model.arch"),
    (["model.norm=batchnorm"], None, "model.norm"),
    (["model.mlp=relu"], None, "model.mlp"),
    (["model.positions=alibi"], None, "model.positions"),
    (["model.preset=llama-tiny", "model.num_query_groups=3"], None, "model.num_query_groups"),
    (["model.preset=llama-tiny", "parallel.tp=4"], None, "model.num_query_groups"),
    (["model.preset=llama-tiny", "model.num_heads=8", "model.hidden_size=120"], None,
     "model.positions=rope"),
    (["model.preset=llama-tiny", "model.rope_base=0"], None, "model.rope_base"),
    (["model.norm_eps=0"], None, "model.norm_eps"),
])
def test_bad_values_name_the_key(overrides, world, key):
    with pytest.raises(ConfigError) as e:
        load_config([str(ROOT / "configs/tiny.yaml")], overrides, world_size=world)
    assert key in str(e.value)


@pytest.mark.parametrize("recipe, label, bits", [
    ("m8v8", "m8/v8 b256", (8, 8)), ("m4v8", "m4/v8 b256", (4, 8)),
    ("m8", "m8/fp32 v b256", (8, 32)), ("m4", "m4/fp32 v b256", (4, 32)),
    ("v8", "fp32 m/v8 b256", (32, 8)), ("m8v8-tensor", "m8/v8 btensor", (8, 8)),
])
def test_optimizer_state_recipes_and_their_report_label(recipe, label, bits):
    """The study's optimizer-state settings; a 32-bit moment is fp32 (what dsq report shows,
    from the params as MLflow stores them: strings)."""
    from dsq.config import flatten, to_dict
    from dsq.tracking.report import _optim_states

    cfg = load_config([str(ROOT / "configs/tiny.yaml"),
                       str(ROOT / f"configs/recipes/optim/{recipe}.yaml")], world_size=2)
    assert (cfg.optim.name, cfg.optim.m_bits, cfg.optim.v_bits) == ("qadamw", *bits)
    params = {k: str(v) for k, v in flatten(to_dict(cfg)).items()}
    assert _optim_states(params) == label
    assert _optim_states({"optim.name": "adamw", "optim.m_bits": "8"}) == "fp32"


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([str(bad)])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config([], ["train.steps"])


def test_deepspeed_json_is_generated():
    from dsq.parallel.engine import deepspeed_config

    cfg = load_config([str(ROOT / "configs/tiny.yaml")],
                      ["train.global_batch=32", "train.micro_batch=4", "deepspeed.precision=bf16"])
    ds = deepspeed_config(cfg, dp_size=2)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == 32
    assert ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage


def test_overlap_comm_and_buckets_reach_deepspeed():
    from dsq.parallel.engine import deepspeed_config

    zero = lambda cuda, *o: deepspeed_config(load_config([], list(o)), 2, cuda=cuda)[
        "zero_optimization"]
    # null: on with ZeRO 1/2 on GPUs, off on CPUs; DeepSpeed's default buckets
    assert zero(True)["overlap_comm"] is True and zero(False)["overlap_comm"] is False
    assert zero(True, "deepspeed.zero_stage=1")["overlap_comm"] is True
    assert zero(True, "deepspeed.zero_stage=0") == {"stage": 0}
    assert zero(True, "deepspeed.overlap_comm=false")["overlap_comm"] is False
    z = zero(False, "deepspeed.overlap_comm=true", "deepspeed.reduce_bucket_size=200000000",
             "deepspeed.allgather_bucket_size=100000000")
    assert (z["overlap_comm"], z["reduce_bucket_size"], z["allgather_bucket_size"]) == (
        True, 200_000_000, 100_000_000)
    assert zero(False)["reduce_bucket_size"] == zero(False)["allgather_bucket_size"] == 500_000_000
    with pytest.raises(ConfigError, match="deepspeed.allgather_bucket_size=3"):
        load_config([], ["deepspeed.allgather_bucket_size=3"])


def test_optimizer_block_too_wide_is_refused_by_dsq_config():
    """Every component's validation runs in `dsq config` (before any process group or data):
    a block wider than the update kernel takes is one line naming the key, exit 2."""
    res = dsq("config", "configs/tiny.yaml", "optim.name=qadamw", "optim.block_size=32768",
              check=False)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(err) == 1, res.stderr
    assert err[0].startswith("dsq: error: optim.block_size=32768") and res.stdout == ""


def test_recompute_modes():
    assert load_config([str(ROOT / "configs/tiny.yaml")]).train.recompute == "none"
    for mode in ("none", "selective", "full"):
        cfg = load_config([str(ROOT / "configs/tiny.yaml")], [f"train.recompute={mode}"])
        assert cfg.train.recompute == mode and f"recompute: {mode}" in to_yaml(cfg)


@pytest.mark.slow
def test_bad_config_cli_fails_fast_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    res = dsq("train", "configs/tiny.yaml", "model.num_heads=3", f"train.out_dir={out}",
              check=False)
    assert res.returncode == 2
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "model.num_heads" in err[0], res.stderr
    assert not out.exists()
    # through the launcher: the layout is checked before any rank starts
    res = launch(2, "configs/tiny.yaml", "parallel.tp=4", f"train.out_dir={out}", check=False)
    assert res.returncode == 2
    assert "parallel.tp" in res.stderr and "deepspeed" not in res.stdout.lower()
    assert not out.exists()
    # bad data: one message, no run directory
    res = dsq("train", "configs/tiny.yaml", f"data.train=[{tmp_path}/missing.txt]",
              f"train.out_dir={out}", f"data.cache_dir={tmp_path}/cache", check=False)
    assert res.returncode == 2 and "missing.txt" in res.stderr and "does not exist" in res.stderr
    assert not out.exists()
    assert not list(Path(tmp_path / "cache").glob("*/manifest.json"))


def test_the_study_setup_for_32_ranks():
    from dsq.parallel.engine import deepspeed_config

    owt = str(ROOT / "configs/gpt2-small-owt.yaml")
    cfg = load_config([owt, str(ROOT / "configs/recipes/w8a8g8.yaml")], world_size=32)
    m, t, o = cfg.model, cfg.train, cfg.optim
    assert (m.num_layers, m.hidden_size, m.num_heads, m.seq_len, m.dropout) == (
        12, 768, 12, 1024, 0.1)
    assert t.global_batch * m.seq_len == 524_288 and t.steps == 300_000
    assert (o.lr, o.warmup_steps, o.min_lr, o.weight_decay, o.grad_clip) == (
        6e-4, 1000, 0.0, 0.1, 1.0)
    assert cfg.deepspeed.precision == "bf16" and cfg.data.val == []
    assert cfg.data.val_fraction == 0.0005 and cfg.data.train == ["Skylion007/openwebtext"]
    ds = deepspeed_config(cfg, dp_size=32)
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 512
    assert deepspeed_config(load_config([owt], ["parallel.tp=2"], world_size=32), 16)[
        "gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match="train.global_batch=512"):
        load_config([owt], world_size=24)


def test_val_fraction_and_val_are_exclusive():
    with pytest.raises(ConfigError, match="data.val and data.val_fraction"):
        load_config([], ["data.val_fraction=0.01"])
    with pytest.raises(ConfigError, match="data.val is empty"):
        load_config([], ["data.val=[]"])
    with pytest.raises(ConfigError, match="data.val_fraction=0.7"):
        load_config([], ["data.val=[]", "data.val_fraction=0.7"])


def test_list_keys_take_one_plain_value(tmp_path):
    cfg = load_config([str(ROOT / "configs/tiny.yaml")], ["data.train=/my/corpus",
                                                          "quant.exclude=fc1"])
    assert cfg.data.train == ["/my/corpus"] and cfg.quant.exclude == ["fc1"]
    assert load_config([], ["data.train=[a,b]"]).data.train == ["a", "b"]
    y = tmp_path / "d.yaml"
    y.write_text("data:\n  val: /my/val.txt\n  train: [x, y]\n")
    cfg = load_config([str(y)])
    assert cfg.data.val == ["/my/val.txt"] and cfg.data.train == ["x", "y"]


def test_dsq_config_accepts_a_plain_path(tmp_path):
    res = dsq("config", "configs/tiny.yaml", f"data.train={tmp_path}")
    assert f"train:\n  - {tmp_path}\n" in res.stdout


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "command line: train.steps='abc' is not an integer: give e.g. "
                        "train.steps=200"),
    ("optim.lr=fast", "command line: optim.lr='fast' is not a number: give e.g. optim.lr=0.0006"),
    ("train.progress=maybe", "train.progress='maybe' is not true or false: give e.g. "
                             "train.progress=true"),
    ("data.train={a: 1}", "data.train={'a': 1} is not a list of strings (or one string): give "
                          "e.g. data.train=/path/to/texts or data.train=[a,b]"),
    ("train.stepz=3", "key 'train.stepz' is not a config key"),
])
def test_type_errors_name_key_type_and_example(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert message in str(e.value)
    assert "AnyNode" not in str(e.value) and "\n" not in str(e.value)


def test_llama_1b_fineweb_for_32_ranks(capsys):
    """`dsq config configs/llama-1b-fineweb.yaml --world-size 32` validates; the resolved
    numbers and the memory table (`--memory`) are those README.md and docs/models.md print."""
    from dsq.cli import main
    from dsq.parallel.engine import deepspeed_config

    path = str(ROOT / "configs/llama-1b-fineweb.yaml")
    main(["config", path, "--world-size", "32"])
    assert "preset: llama-1b" in capsys.readouterr().out
    cfg = load_config([path], world_size=32)
    m, t, o = cfg.model, cfg.train, cfg.optim
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_query_groups, m.ffn_hidden_size,
            m.seq_len, m.vocab_size, m.tie_embeddings) == (22, 2048, 32, 4, 5632, 2048, 32000,
                                                           False)
    assert (m.norm, m.mlp, m.positions, m.bias, m.dropout) == ("rmsnorm", "swiglu", "rope",
                                                               False, 0.0)
    assert t.global_batch * m.seq_len == 1_048_576 and t.steps == 10_000
    assert t.steps * t.global_batch * m.seq_len == 10_485_760_000  # "10.5B tokens"
    assert (o.name, o.lr, o.min_lr, o.warmup_steps, o.beta2, o.weight_decay, o.grad_clip) == (
        "adamw", 3e-4, 3e-5, 500, 0.95, 0.1, 1.0)
    assert (cfg.deepspeed.precision, cfg.deepspeed.zero_stage, t.recompute) == ("bf16", 2, "none")
    assert cfg.data.train == ["HuggingFaceFW/fineweb-edu:sample-10BT"] and cfg.data.val == []
    ds = deepspeed_config(cfg, dp_size=32)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2)
    for layout in (["train.micro_batch=4"], ["parallel.tp=2"], ["train.recompute=full",
                                                                 "train.micro_batch=16"]):
        load_config([path], layout, world_size=32)  # the alternatives docs/models.md gives
    readme = (ROOT / "README.md").read_text()
    models = (ROOT / "docs/models.md").read_text()
    for text in ("512 x 2048 = 1,048,576 tokens per step", "10,000 steps (10.5B tokens)",
                 "AdamW 3e-4", "micro batch 8 with 2 accumulation steps"):
        assert text in readme, text
    for recipe in ([], [str(ROOT / "configs/recipes/w8a8g8.yaml")]):
        main(["config", path, *recipe, "--world-size", "32", "--memory"])
        table = capsys.readouterr().out
        assert table in models
        if not recipe:
            assert table in readme
    lines = table.splitlines()
    assert lines[0].startswith("llama-1b: 1,100,048,384 parameters; 32 ranks = tp 1 x dp 32")


@pytest.mark.parametrize("text, says", [
    ("train:\n  steps: 10\n  eval_every: [1, 2\nmodel:\n  preset: tiny\n",
     "line 4, column 6: did not find expected ',' or ']' (while parsing a flow sequence at "
     "line 3, column 15)"),
    ("train:\n  steps: 10\n\tlr: 3\n", "line 3, column 1: found a tab character that violates "
     "indentation (while scanning a plain scalar at line 2, column 10)"),
    ("train:\n  steps: 10\n   eval_every: 3\n",
     "line 3, column 14: mapping values are not allowed in this context"),
])
def test_a_yaml_syntax_error_names_line_and_column(tmp_path, capsys, text, says):
    from dsq.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    want = (f"config file {str(path)!r} is not valid YAML at {says}: fix the syntax there "
            f"(indent with spaces, close every bracket and quote, one 'key: value' per line)")
    with pytest.raises(ConfigError) as e:
        load_config([str(path)])
    assert str(e.value) == want
    with pytest.raises(SystemExit) as e:
        main(["config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"dsq: error: {want}"]


def test_mlflow_file_store_is_refused_up_front_unless_mlflow_allows_it(monkeypatch):
    """mlflow 3.13+ raises on a file store unless MLFLOW_ALLOW_FILE_STORE is true: a run given
    one would train with every metric queued for a store that never answers."""
    from importlib import metadata

    from packaging.version import Version

    from dsq.config.sections import FILE_STORE_GUARD, file_store_refused

    guarded = Version(metadata.version("mlflow")) >= Version(FILE_STORE_GUARD)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in ("file:///tmp/mlruns", "file:mlruns", "mlruns"):
        assert file_store_refused(uri) is guarded
    for uri in ("sqlite:///runs/mlflow.db", "http://127.0.0.1:5000", "databricks"):
        assert file_store_refused(uri) is False
    if guarded:
        with pytest.raises(ConfigError, match=r"tracking.uri=file:///tmp/mlruns is MLflow's "
                                              r"file store.*MLFLOW_ALLOW_FILE_STORE=true"):
            load_config([], ["tracking.uri=file:///tmp/mlruns"])
    load_config([], ["tracking.uri=file:///tmp/mlruns", "tracking.enabled=false"])
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert file_store_refused("file:///tmp/mlruns") is False
    load_config([], ["tracking.uri=file:///tmp/mlruns"])
