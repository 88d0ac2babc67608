"""The trainer: a megatron-core GPT under DeepSpeed, with evaluation, checkpoints and MLflow."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from dsq import checkpoint
from dsq.config import Config, flatten, to_dict, to_yaml
from dsq.data.dataset import GlobalSchedule, TokenBlocks, eval_indices
from dsq.data.prepare import DataError, load_manifest, prepare
from dsq.distributed import (
    DistEnv,
    all_reduce_host,
    all_reduce_mean,
    barrier,
    bcast_error,
    broadcast_object,
    device,
    dumps,
    gather_ints,
    init_distributed,
    initialize_engine,
)
from dsq.evaluate import token_loss
from dsq.models.quant_layers import collect_sqnr, set_sqnr_capture
from dsq.progress import Progress, SpikeGuard
from dsq.rundir import RunDirError, RunLock, check_resume, saved_dp
from dsq.runinfo import num_nodes, peak_gpu_bytes, peak_rss_bytes, run_provenance
from dsq.runtime import clear_stale_build_locks, configure_kernels
from dsq.stop import Preempted, StopRequest
from dsq.tracking import (
    RUN_ARTIFACTS,
    Tracker,
    normalize_uri,
    plot_loss_curve,
    read_metrics_log,
    ui_command,
)


def lr_lambda(optim_cfg, total_steps: int):
    """Linear warmup, then cosine decay from lr to min_lr at ``total_steps`` (a factor of lr)."""
    warm, floor = optim_cfg.warmup_steps, optim_cfg.min_lr / optim_cfg.lr

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def _tokens_per_s(tokens_per_step: int, times: List[float]) -> float:
    """Mean throughput, leaving out the first step (allocation and warm-up) when there are more."""
    timed = times[1:] if len(times) > 1 else times
    return tokens_per_step * len(timed) / sum(timed) if timed else 0.0


def _warn(msg: str) -> None:
    print(f"dsq: warning: {msg}", file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        self.lock: Optional[RunLock] = None
        try:
            self._setup(cfg, env)
        except BaseException:
            if self.lock is not None:  # a refused or failed start leaves no holder record
                self.lock.release(failed_start=True)
            raise

    def _setup(self, cfg: Config, env: DistEnv) -> None:
        from megatron.core import parallel_state as ps

        from dsq.models.gpt import build_gpt, count_params
        from dsq.optim import build_optimizer, optimizer_state_bytes

        self.cfg, self.env = cfg, env
        self.out_dir = Path(cfg.train.out_dir).resolve()
        self.ckpt_dir = self.out_dir / "checkpoints"
        # stop signals first: one during a native build or data preparation ends in a clean stop
        self.stop = StopRequest()
        clear_stale_build_locks()
        init_distributed(env, cfg.parallel.tp, timeout_s=cfg.parallel.timeout_s)
        self.kernels = configure_kernels(cfg)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.device = device()
        self._state_bytes = optimizer_state_bytes
        self.log = print if env.is_main else (lambda *a, **k: None)

        # the run directory: one writer, and a resume this config can make, before any write
        verdict, err = (None, []), None
        if env.is_main:
            try:
                verdict = self._claim_run_dir()
            except RunDirError as e:
                err = str(e)
        err = bcast_error(err)
        if err:
            raise RunDirError(err)
        self.resume_tag, self.config_changes = broadcast_object(verdict)

        # data: rank 0 prepares, the others wait for its verdict
        prepared, err = None, None
        if env.is_main:
            try:
                prepared = str(prepare(cfg.data, cfg.model.vocab_size, log=self.log))
            except DataError as e:
                err = str(e)
        err = bcast_error(err)
        if err:
            raise DataError(err)
        self.data_dir = Path(broadcast_object(prepared))
        L = cfg.model.seq_len
        self.train_data = TokenBlocks(self.data_dir, "train", L)
        self.val_data = TokenBlocks(self.data_dir, "val", L)
        self.schedule = GlobalSchedule(len(self.train_data), cfg.train.global_batch, cfg.train.seed)
        self.val_idx = eval_indices(len(self.val_data), cfg.train.eval_samples)

        # model, optimizer, schedule, engine
        model = build_gpt(cfg.model, cfg.deepspeed.precision, seed=cfg.train.seed)
        self.quantized = self._apply_quantization(model)
        self.params = count_params(model, self.tp_size)
        optimizer = build_optimizer(model, cfg.optim)
        fn = lr_lambda(cfg.optim, cfg.train.steps)
        self.engine, self.optimizer, self.scheduler, self.ds_config = initialize_engine(
            cfg, model, optimizer, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn),
            self.dp_size)
        self.model = model
        self._attach_optimizer()

        # run directory, tracking, resume
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
            (self.out_dir / "ds_config.json").write_text(dumps(self.ds_config))
            self._record_changes()
        barrier()
        self.step = 0
        tag = self.resume_tag
        if tag is not None:
            state = checkpoint.load(self.engine, self.ckpt_dir, tag)
            self.step = int(state["step"])
            self.log(f"resumed from {self.ckpt_dir / tag} at step {self.step}")
        self.tracker = Tracker.from_config(cfg, self.out_dir, enabled=env.is_main)
        self._sysmon = None
        if env.is_main:
            self._start_tracking()
        self.sqnr: Dict[str, float] = {}
        self.log(f"model: {cfg.model.preset} {self.params / 1e6:.2f}M parameters, "
                 f"tp={self.tp_size} dp={self.dp_size} zero={cfg.deepspeed.zero_stage} "
                 f"{cfg.deepspeed.precision}; quantized linears: {len(self.quantized)}")

    def _claim_run_dir(self) -> Tuple[Optional[str], List]:
        """Rank 0: lock the run directory, repair its checkpoints, check that the newest valid
        one can resume under this config (resharding it with ``train.reshard: auto``).
        Returns ``(tag to resume or None, allowed config changes)``."""
        from omegaconf import OmegaConf

        self.lock = RunLock(self.out_dir)
        self.lock.acquire()
        if self.lock.stale:
            _warn(f"took over the lock of {self.out_dir} left by {self.lock.stale} (no longer "
                  f"running)")
        tag = checkpoint.find_resume(self.ckpt_dir, repair=True, warn=_warn)
        if tag is None:
            return None, []
        tag_dir = self.ckpt_dir / tag
        saved = flatten(OmegaConf.to_container(OmegaConf.load(tag_dir / "config.yaml")))
        changes = check_resume(saved, flatten(to_dict(self.cfg)), tag_dir)
        old_dp = saved_dp(tag_dir)
        if self.cfg.deepspeed.zero_stage > 0 and old_dp and old_dp != self.dp_size:
            if self.cfg.train.reshard != "auto":
                raise RunDirError(
                    f"checkpoint {tag_dir} was written by {old_dp} data-parallel ranks and this "
                    f"run has {self.dp_size}: convert it first with `dsq ckpt reshard "
                    f"{self.ckpt_dir} --dp {self.dp_size}` (or set train.reshard=auto), or "
                    f"launch {old_dp * self.tp_size} ranks")
            from dsq.reshard import reshard_checkpoint

            reshard_checkpoint(self.ckpt_dir, tag, self.dp_size)
            self.log(f"resharded {tag_dir} from dp={old_dp} to dp={self.dp_size} "
                     f"(original kept as {tag}.dp{old_dp})")
            changes.append(("layout.dp", old_dp, self.dp_size))
        return tag, changes

    def _record_changes(self) -> None:
        """Log the allowed config changes of this resume and append them to
        ``config_changes.jsonl`` (MLflow gets them as the tag ``dsq.config_changes``)."""
        if not self.config_changes:
            return
        text = ", ".join(f"{k} {a} -> {b}" for k, a, b in self.config_changes)
        self.log(f"resuming {self.resume_tag} with changed settings: {text}")
        with open(self.out_dir / "config_changes.jsonl", "a") as fh:
            fh.write(json.dumps({"resume_from": self.resume_tag, "time": time.time(),
                                 "changes": [[k, a, b] for k, a, b in self.config_changes]},
                                default=str) + "\n")

    def _start_tracking(self) -> None:
        cfg, t = self.cfg, self.tracker
        # metrics.jsonl is the local record; MLflow gets whatever it has not seen yet
        for row in self._trim_metrics_log():
            t.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
        t.log_params({**flatten(to_dict(cfg)), **run_provenance(), **self.kernels})
        t.set_tags({"dsq.recipe": cfg.tracking.recipe, "dsq.precision": cfg.deepspeed.precision,
                    "dsq.layout": f"tp{self.tp_size}xdp{self.dp_size}",
                    "dsq.zero_stage": cfg.deepspeed.zero_stage, "dsq.preset": cfg.model.preset,
                    "dsq.slurm_job_id": os.environ.get("SLURM_JOB_ID", "none")})
        if (self.out_dir / "config_changes.jsonl").is_file():
            t.set_tags({"dsq.config_changes": (self.out_dir / "config_changes.jsonl").read_text()
                        [-5000:]})
        t.log_artifact(self.out_dir / "config.yaml")
        t.log_artifact(self.out_dir / "ds_config.json")
        if cfg.tracking.system_metrics and t.enabled and t.flush(5.0) and t.run_id:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._sysmon = SystemMetricsMonitor(t.run_id, sampling_interval=10,
                                                    resume_logging=True, tracking_uri=t.uri)
                self._sysmon.start()
            except Exception:  # optional: psutil/pynvml missing or an old MLflow
                self._sysmon = None

    # ------------------------------------------------------------------ extension seams
    def _apply_quantization(self, model) -> List[str]:
        from dsq.models.quant_layers import apply_quantization

        return apply_quantization(model, self.cfg.quant)

    def _measure_sqnr(self, step: int) -> bool:
        """SQNR is measured on the training step that ends at an evaluation (and the last)."""
        cfg = self.cfg.train
        return bool(self.quantized) and (step == cfg.steps or
                                         bool(cfg.eval_every and step % cfg.eval_every == 0))

    def _attach_optimizer(self) -> None:
        from dsq.optim import attach_to_engine

        attach_to_engine(self.engine)

    # ------------------------------------------------------------------ steps
    def _batch(self, indices, data: TokenBlocks):
        tokens = data.batch(indices).to(self.device)
        L = tokens.shape[1] - 1
        pos = torch.arange(L, device=self.device).unsqueeze(0).expand(tokens.shape[0], -1)
        return tokens[:, :-1], pos, tokens[:, 1:]

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns the mean loss over all ranks."""
        cfg = self.cfg.train
        micro = self.schedule.micro_batches(self.step, self.dp_rank, self.dp_size, cfg.micro_batch)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for idx in micro:
            ids, pos, labels = self._batch(idx, self.train_data)
            loss = self.engine(ids, pos, None, labels=labels).float().mean()
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        self.step += 1
        return all_reduce_mean(total.item() / len(micro))  # one device sync per step

    @torch.no_grad()
    def evaluate(self, indices: Optional[List[int]] = None, data: Optional[TokenBlocks] = None
                 ) -> Dict[str, float]:
        """Mean token loss over a fixed set of sequences, split across data-parallel ranks."""
        indices = self.val_idx if indices is None else indices
        data = data or self.val_data
        mine = indices[self.dp_rank::self.dp_size]
        mb = self.cfg.train.micro_batch
        self.engine.eval()
        try:
            return token_loss(self.engine, (self._batch(mine[i:i + mb], data)
                                            for i in range(0, len(mine), mb)),
                              self.device, group=self.dp_group)
        finally:
            self.engine.train()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float:
        g = self.engine.get_global_grad_norm()
        return float(g) if g is not None else float("nan")

    def save(self) -> None:
        if self.env.is_main:
            self.tracker.flush()
        state = {"step": self.step, "config": to_dict(self.cfg)}
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.step, state, self.cfg.train.keep_ckpts,
                              extra_files={"config.yaml": to_yaml(self.cfg)})
        if self.env.is_main:
            tok = self.data_dir / "tokenizer.model"
            (self.ckpt_dir / tag / "tokenizer.model").write_bytes(tok.read_bytes())

    # ------------------------------------------------------------------ loop
    def train(self) -> Dict:
        cfg = self.cfg.train
        done = self.out_dir / "summary.json"
        if self.step >= cfg.steps and done.is_file():
            # the same command again after the run finished (a requeue, a rerun): keep its results
            self.log(f"nothing to do: {self.out_dir} finished at step {self.step} (train.steps="
                     f"{cfg.steps}); raise train.steps to train on, or use a new train.out_dir")
            return json.loads(done.read_text())
        tokens_per_step = cfg.global_batch * self.cfg.model.seq_len
        bar = None
        if self.env.is_main:
            bar = Progress(cfg.steps, self.step, cfg.log_every, enabled=cfg.progress)
        guard = SpikeGuard(cfg.spike_factor, cfg.spike_window)
        times: List[float] = []  # seconds per step, this process
        loss, val = float("nan"), None
        while self.step < cfg.steps:
            capture = self._measure_sqnr(self.step + 1)
            if capture:
                set_sqnr_capture(self.model, True)
            t0 = time.perf_counter()
            loss = self.train_step()
            dt = time.perf_counter() - t0
            times.append(dt)
            sqnr = {}
            if capture:
                sqnr = collect_sqnr(self.model)  # collective over the TP group
                set_sqnr_capture(self.model, False)
                self.sqnr = sqnr
            tps = _tokens_per_s(tokens_per_step, times)
            metrics = {"train/loss": loss, "train/lr": self.lr(), "train/grad_norm": self.grad_norm(),
                       "train/tokens_per_s": tokens_per_step / dt,
                       **{f"sqnr_db/{k}": v for k, v in sqnr.items()}}
            spike = guard.check(self.step, loss)
            if spike is not None:
                metrics["train/loss_spike"] = spike
                if bar is not None:
                    bar.write(f"dsq: warning: loss spike at step {self.step}: {loss:.4f} is "
                              f"{spike:.2f}x the median of the steps before "
                              f"(train.spike_factor={cfg.spike_factor:g})")
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {self.step}: lower "
                                         f"optim.lr or check the data")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                val = self.evaluate()
                metrics.update({"val/loss": val["loss"], "val/ppl": val["ppl"],
                                **self._resource_metrics()})
            if self.env.is_main:
                self._log_step(metrics)
                if bar is not None:
                    post = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"}
                    if val is not None:
                        post["val"] = f"{val['loss']:.4f}"
                    bar.update(self.step, post)
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self.save()
            signum = self.stop.agreed()
            if signum and self.step < cfg.steps:
                if bar is not None:
                    bar.close()
                if not (self.ckpt_dir / checkpoint.tag_for(self.step) / checkpoint.MARKER).exists():
                    self.save()
                raise Preempted(self.step, signum)
        if bar is not None:
            bar.close()
        val = self.evaluate()
        final = {"val/loss": val["loss"], "val/ppl": val["ppl"], **self._resource_metrics()}
        if self.env.is_main:
            self._log_step(final)
        if not (self.ckpt_dir / checkpoint.tag_for(self.step) / checkpoint.MARKER).exists():
            self.save()
        self.loss_spikes = guard.spikes
        return self._summary(loss, val, _tokens_per_s(tokens_per_step, times))

    def _resource_metrics(self) -> Dict[str, float]:
        """Peak memory (host, and GPU on CUDA) and optimizer state bytes, max over ranks
        (collective: all ranks call)."""
        opt = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        rss, gpu, state = all_reduce_host(
            [peak_rss_bytes(), peak_gpu_bytes(self.device), self._state_bytes(opt)], "max")
        out = {"mem/peak_rss_bytes": rss, "optim/state_bytes": state}
        if self.device.type == "cuda":
            out["mem/peak_gpu_bytes"] = gpu
        return out

    def _log_step(self, metrics: Dict[str, float]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": self.step, **metrics}) + "\n")
        if self.step % self.cfg.train.log_every == 0 or "val/loss" in metrics:
            self.tracker.log_metrics(metrics, self.step)

    def _trim_metrics_log(self) -> List[Dict]:
        """After a resume, drop metric lines of steps the run will compute again."""
        rows = read_metrics_log(self.out_dir, up_to_step=self.step)
        (self.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def _summary(self, loss: float, val: Dict, tokens_per_s: float) -> Dict:
        opt = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        state_bytes = gather_ints(self._state_bytes(opt))
        rss = gather_ints(peak_rss_bytes())
        gpu = gather_ints(peak_gpu_bytes(self.device))
        if self.env.is_main and self.tracker.enabled and self.tracker.run_id is None:
            self.tracker.flush(5.0)  # the run id comes with the first contact
        summary = {
            "final_step": self.step,
            "train_loss": loss,
            "val_loss": val["loss"],
            "val_ppl": val["ppl"],
            "vocab_size": self.cfg.model.vocab_size,
            "tokenizer_vocab_size": load_manifest(self.data_dir)["tokenizer_vocab_size"],
            "tokens_per_s": tokens_per_s,
            "params": self.params,
            "optimizer_state_bytes": state_bytes,
            "peak_rss_bytes": rss,
            "peak_gpu_bytes": gpu,
            "device": self.device.type,
            "world_size": self.env.world_size,
            "nodes": num_nodes(),
            "tp": self.tp_size,
            "dp": self.dp_size,
            "mlflow_run_id": self.tracker.run_id,
            "tracking_uri": self.tracker.uri if self.tracker.enabled else None,
            "out_dir": str(self.out_dir),
            "quantized_layers": len(self.quantized),
            "quant_sqnr_db": self.sqnr,
            "loss_spikes": getattr(self, "loss_spikes", []),
        }
        if self.env.is_main:
            path = self.out_dir / "summary.json"
            path.write_text(json.dumps(summary, indent=2))
            self.tracker.log_metrics({
                "summary/tokens_per_s": tokens_per_s, "summary/peak_rss_bytes": max(rss),
                **({"summary/peak_gpu_bytes": max(gpu)} if self.device.type == "cuda" else {}),
                "summary/optimizer_state_bytes": max(state_bytes),
                "summary/optimizer_state_bytes_per_param": sum(state_bytes) / self.params,
                "summary/train_loss": loss, "summary/val_loss": val["loss"],
                "summary/val_ppl": val["ppl"]}, self.step)
            plot_loss_curve(self.out_dir)
            for name in RUN_ARTIFACTS[2:]:
                if (self.out_dir / name).is_file():
                    self.tracker.log_artifact(self.out_dir / name)
            self.tracker.log_artifact(self.data_dir / "tokenizer.model")
        return summary

    def close(self, status: str = "FINISHED") -> None:
        if getattr(self, "stop", None) is not None:
            self.stop.restore()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
        if getattr(self, "_sysmon", None) is not None:
            self._sysmon.finish()
        if self.env.is_main and getattr(self, "tracker", None) is not None:
            t0 = time.perf_counter()
            sent = self.tracker.close(status)
            self.tracking_close_s = time.perf_counter() - t0
            if not sent:
                self.log(f"MLflow: {self.tracker.pending} operations not sent; later run "
                         f"`dsq mlflow sync {self.out_dir}`")


def run(cfg: Config, env: DistEnv) -> Dict:
    trainer = Trainer(cfg, env)
    status = "FAILED"
    try:
        summary = trainer.train()
        status = "FINISHED"
    except Preempted as e:
        status = "KILLED"
        if env.is_main:
            print(f"\n{e}", flush=True)
        raise
    finally:
        trainer.close(status)
    if env.is_main:
        uri = normalize_uri(cfg.tracking.uri)
        print(f"\ndone: step {summary['final_step']}  train loss {summary['train_loss']:.4f}  "
              f"val loss {summary['val_loss']:.4f}  val ppl {summary['val_ppl']:.2f}  "
              f"{summary['tokens_per_s']:,.0f} tokens/s")
        print(f"results: {trainer.out_dir / 'summary.json'}")
        if cfg.tracking.enabled:
            print(f"MLflow: experiment '{cfg.tracking.experiment}', run {summary['mlflow_run_id']}"
                  f" in {uri}\n  view it: {ui_command(uri, trainer.tracker.experiment_id)}")
    return summary
