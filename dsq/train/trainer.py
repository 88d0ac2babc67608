"""The trainer: a megatron-core GPT under DeepSpeed, with evaluation, checkpoints and MLflow.

Setup runs in named steps (run directory, data, model and engine, resume, tracking); the loop
(:meth:`Trainer.train`) orders the components of :mod:`dsq.train.components`, which own their
cadence. Use it as a context manager, or :func:`run`, so the run lock, signal handlers and the
MLflow run are always released."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from dsq import runtime
from dsq.config import Config, to_dict, to_yaml
from dsq.data.dataset import GlobalSchedule, TokenBlocks, eval_indices
from dsq.data.prepare import DataError, load_manifest, prepare
from dsq.models.quant_layers import collect_sqnr, set_sqnr_capture
from dsq.parallel import (
    DistEnv,
    all_reduce_mean,
    barrier,
    bcast_error,
    broadcast_object,
    device,
    gather_ints,
    init_distributed,
)
from dsq.parallel.engine import dumps, initialize_engine
from dsq.run.info import num_nodes, peak_gpu_bytes, peak_rss_bytes
from dsq.optim import optimizer_line
from dsq.quant import LinearQuant
from dsq.run.rundir import RunDirError, RunLock, claim
from dsq.tracking import Tracker
from dsq.train.components import Checkpointer, EvalSchedule, StepLogger
from dsq.train.evaluation import token_loss
from dsq.train.health import StepHealth, hints
from dsq.train.record import RunRecord, resource_metrics
from dsq.train.schedule import lr_lambda
from dsq.train.stop import Preempted, StopRequest
from dsq.train.throughput import Throughput, model_flops_per_token, peak_flops


class Trainer:
    """One training run on this rank. ``with Trainer(cfg, env) as t: t.train()``."""

    cfg: Config
    env: DistEnv
    out_dir: Path
    ckpt_dir: Path
    stop: StopRequest
    lock: Optional[RunLock] = None
    record: Optional["RunRecord"] = None
    tracker: Optional[Tracker] = None
    kernels: Dict[str, str]
    dp_rank: int
    dp_size: int
    tp_size: int
    device: torch.device
    resume_tag: Optional[str]
    config_changes: List
    data_dir: Path
    train_data: TokenBlocks
    val_data: TokenBlocks
    schedule: GlobalSchedule
    evals: EvalSchedule
    model: torch.nn.Module
    quantized: List[str]
    params: int
    engine: object
    checkpointer: Checkpointer
    step: int = 0
    sqnr: Dict[str, float]
    loss_spikes: List[int]

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.out_dir = Path(cfg.train.out_dir).resolve()
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.log = print if env.is_main else (lambda *a, **k: None)
        self.sqnr, self.loss_spikes = {}, []
        self.health = StepHealth(cfg.train.max_skipped_steps, hints(cfg))
        self.applied = True  # whether DeepSpeed applied the last step's update
        # stop signals first: one during a native build or data preparation ends in a clean stop
        self.stop = StopRequest()
        try:
            self._setup_process()
            self._claim_run_dir()
            self._setup_data()
            self._setup_model()
            self._resume()
            self._setup_tracking()
        except BaseException:
            self.close("FAILED", failed_start=True)
            raise

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = ("FINISHED" if exc_type is None else
                  "KILLED" if issubclass(exc_type, (Preempted, KeyboardInterrupt)) else "FAILED")
        self.close(status)

    # ------------------------------------------------------------------ setup steps
    def _setup_process(self) -> None:
        """Process groups, the kernels of this run, this rank's place in the layout."""
        from megatron.core import parallel_state as ps

        runtime.clear_stale_build_locks()
        init_distributed(self.env, self.cfg.parallel.tp, timeout_s=self.cfg.parallel.timeout_s)
        self.kernel_choice = runtime.resolve_kernels(self.cfg)
        runtime.apply_kernels(self.kernel_choice)
        self.kernels = runtime.describe_kernels(self.kernel_choice, self.cfg.optim.name == "qadamw",
                                                runtime.fp8_states(self.cfg.optim))
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.device = device()

    def _claim_run_dir(self) -> None:
        """Rank 0 locks the run directory and decides the resume; every rank gets the verdict."""
        verdict, err = (None, []), None
        if self.env.is_main:
            try:
                self.lock = RunLock(self.out_dir)
                verdict = claim(self.lock, self.cfg, self.dp_size, self.tp_size, log=self.log)
            except RunDirError as e:
                err = str(e)
        err = bcast_error(err)
        if err:
            raise RunDirError(err)
        self.resume_tag, self.config_changes = broadcast_object(verdict)

    def _setup_data(self) -> None:
        """Rank 0 prepares the data (or finds it prepared); the others wait for its verdict."""
        cfg = self.cfg
        prepared, err = None, None
        if self.env.is_main:
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
        self.evals = EvalSchedule(cfg.train.eval_every, cfg.train.steps)

    def _setup_model(self) -> None:
        """Model, quantized layers, optimizer, schedule and the DeepSpeed engine."""
        from dsq.models.gpt import build_gpt, count_params
        from dsq.models.quant_layers import apply_quantization
        from dsq.optim import attach_to_engine, build_optimizer

        cfg = self.cfg
        model = build_gpt(cfg.model, cfg.deepspeed.precision, seed=cfg.train.seed,
                          recompute=cfg.train.recompute)
        self.quantized = apply_quantization(model, cfg.quant)
        self.params = count_params(model, self.tp_size)
        optimizer = build_optimizer(model, cfg.optim, kernel=self.kernel_choice.optim)
        fn = lr_lambda(cfg.optim, cfg.train.steps)
        self.engine, _, _, self.ds_config = initialize_engine(
            cfg, model, optimizer, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn),
            self.dp_size)
        self.model = model
        attach_to_engine(self.engine)
        self.checkpointer = Checkpointer(
            self.engine, self.ckpt_dir, cfg.train.ckpt_every, cfg.train.steps,
            cfg.train.keep_ckpts, state=self._checkpoint_state, background=cfg.train.async_ckpt,
            files=lambda: {"config.yaml": to_yaml(cfg),
                           "tokenizer.model": (self.data_dir / "tokenizer.model").read_bytes()})

    def _resume(self) -> None:
        """Write the run directory's records, then restore the checkpoint to resume, if any."""
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(self.cfg))
            (self.out_dir / "ds_config.json").write_text(dumps(self.ds_config))
            (self.out_dir / "tokenizer.model").write_bytes(
                (self.data_dir / "tokenizer.model").read_bytes())
        barrier()
        if self.resume_tag is not None:
            state = self.checkpointer.load(self.resume_tag)
            self.step = int(state["step"])
            self.health.load(state.get("health"), self.step)
            self.log(f"resumed from {self.ckpt_dir / self.resume_tag} at step {self.step}")

    def _setup_tracking(self) -> None:
        """The run's record and MLflow run (rank 0), the step logger, and the start-up lines."""
        cfg = self.cfg
        self.record = RunRecord(cfg, self.out_dir, enabled=self.env.is_main, log=self.log)
        self.record.record_changes(self.resume_tag, self.config_changes)
        self.record.start(self.step, self.kernels, self.tp_size, self.dp_size)
        self.tracker = self.record.tracker
        self.logger = StepLogger(self.out_dir, self.tracker, cfg.train, self.step,
                                 enabled=self.env.is_main, vocab_size=cfg.model.vocab_size)
        self.log(f"model: {cfg.model.preset} ({cfg.model.arch}) {self.params / 1e6:.2f}M "
                 f"parameters, "
                 f"tp={self.tp_size} dp={self.dp_size} zero={cfg.deepspeed.zero_stage} "
                 f"{cfg.deepspeed.precision}; quantized linears: {len(self.quantized)}"
                 + (f" ({LinearQuant.from_config(cfg.quant)}, {cfg.quant.compute})"
                    if self.quantized else "")
                 + (f"; recompute: {cfg.train.recompute}" if cfg.train.recompute != "none" else ""))
        self.log(f"optimizer: {optimizer_line(cfg.optim)}")
        if cfg.quant.compute == "int8" or cfg.optim.name == "qadamw" or self.kernel_choice.env:
            self.log(runtime.kernels_line(self.kernels))

    def _checkpoint_state(self, step: int) -> Dict:
        """The client state of a checkpoint; MLflow's queue is flushed first, so a run resumed
        from it has sent every metric up to it."""
        if self.env.is_main:
            self.tracker.flush()
        return {"step": step, "config": to_dict(self.cfg), "health": self.health.state()}

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
        self.applied = self.engine.was_step_applied()  # False: DeepSpeed skipped it (overflow)
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

    def grad_norm(self) -> Optional[float]:
        """The global gradient norm of the last step (None: not computed, as under ZeRO-0)."""
        g = self.engine.get_global_grad_norm()
        return float(g) if g is not None else None

    @property
    def optimizer(self):
        """The client optimizer (DeepSpeed's ZeRO wrapper unwrapped)."""
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)

    # ------------------------------------------------------------------ loop
    def train(self) -> Dict:
        cfg = self.cfg.train
        done = self.out_dir / "summary.json"
        if self.step >= cfg.steps and done.is_file():
            # the same command again after the run finished (a requeue, a rerun): keep its results
            self.log(f"nothing to do: {self.out_dir} finished at step {self.step} (train.steps="
                     f"{cfg.steps}); raise train.steps to train on, or use a new train.out_dir")
            return json.loads(done.read_text())
        speed = Throughput(cfg.global_batch * self.cfg.model.seq_len, self.env.world_size,
                           model_flops_per_token(self.cfg.model),
                           peak_flops(self.device, cfg.peak_flops))
        loss, val = float("nan"), None
        while self.step < cfg.steps:
            capture = bool(self.quantized) and self.evals.due(self.step + 1)
            if capture:
                set_sqnr_capture(self.model, True)
            t0 = time.perf_counter()
            loss = self.train_step()
            speed.add(time.perf_counter() - t0)
            sqnr = {}
            if capture:
                sqnr = self.sqnr = collect_sqnr(self.model)  # collective over the TP group
                set_sqnr_capture(self.model, False)
            gnorm = self.grad_norm()
            bad = self.health.check(self.step, loss, gnorm, self.applied)
            metrics = {"train/loss": loss, "train/lr": self.lr(),
                       "train/grad_norm": float("nan") if gnorm is None else gnorm,
                       **speed.metrics(),
                       **self.health.metrics(), **{f"sqnr_db/{k}": v for k, v in sqnr.items()}}
            self.logger.spike(self.step, loss, metrics)
            if bad:
                self.logger.warn(bad)
            if self.evals.mid_run(self.step):
                val = self.evaluate()
                metrics.update({"val/loss": val["loss"], "val/ppl": val["ppl"],
                                **self._resource_metrics()})
            self.logger.log(self.step, metrics, force=bad is not None)
            post = {"loss": f"{loss:.4f}", **speed.post()}
            if val is not None:
                post["val"] = f"{val['loss']:.4f}"
            self.logger.progress(self.step, post)
            if self.health.diverged:  # before any checkpoint of it
                self.logger.close()
                self.health.raise_diverged(self.step)
            self.checkpointer.maybe_save(self.step, loss=loss, finite=self.health.healthy)
            signum = self.stop.agreed()
            if signum and self.step < cfg.steps:
                self.logger.close()
                self.checkpointer.maybe_save(self.step, last=True, loss=loss,
                                             finite=self.health.healthy)
                raise Preempted(self.step, signum)
        self.logger.close()
        val = self.evaluate()
        self.logger.log(self.step, {"val/loss": val["loss"], "val/ppl": val["ppl"],
                                    **self._resource_metrics()})
        self.checkpointer.maybe_save(self.step, last=True, loss=loss, finite=self.health.healthy)
        self.loss_spikes = self.logger.spikes
        return self._summary(loss, val, speed.summary())

    def _resource_metrics(self) -> Dict[str, float]:
        """Peak memory and optimizer state bytes, max over ranks (all ranks call)."""
        return resource_metrics(self.optimizer, self.device)

    def _summary(self, loss: float, val: Dict, throughput: Dict) -> Dict:
        from dsq.optim import optimizer_state_bytes

        state_bytes = gather_ints(optimizer_state_bytes(self.optimizer))
        rss = gather_ints(peak_rss_bytes())
        gpu = gather_ints(peak_gpu_bytes(self.device))
        self.record.await_run_id()
        summary = {
            "final_step": self.step,
            "train_loss": loss,
            "val_loss": val["loss"],
            "val_ppl": val["ppl"],
            "vocab_size": self.cfg.model.vocab_size,
            "tokenizer_vocab_size": load_manifest(self.data_dir)["tokenizer_vocab_size"],
            **throughput,  # tokens_per_s (+ per device), mfu, model_flops_per_token, peak
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
            "loss_spikes": self.loss_spikes,
            "nonfinite_steps": self.health.nonfinite,  # the divergence policy's counts
            "skipped_steps": self.health.skipped, "ckpt_stall_s": self.checkpointer.stalls,
        }
        self.record.finish(summary, rss, gpu, state_bytes, self.params, self.device.type)
        return summary

    def close(self, status: str = "FINISHED", failed_start: bool = False) -> None:
        """Release what setup took, in any state it got to (idempotent)."""
        self.stop.restore()
        getattr(self, "checkpointer", None) and self.checkpointer.close()  # pending write
        if self.lock is not None:  # a refused or failed start leaves no holder record
            self.lock.release(failed_start=failed_start)
            self.lock = None
        if self.record is not None:
            self.record.close(status)


def run(cfg: Config, env: DistEnv) -> Dict:
    """Train ``cfg`` on this rank and print where the results are (rank 0)."""
    with Trainer(cfg, env) as trainer:
        try:
            summary = trainer.train()
        except Preempted as e:
            if env.is_main:
                print(f"\n{e}", flush=True)
            raise
    trainer.record.print_result(summary)
    return summary
