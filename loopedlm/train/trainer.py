"""The training run (docs/design.md#training-recipe, with the diagnostics of
docs/design.md#diagnostics): `train(cfg)` builds the model, optimiser and data from a
`TrainConfig`, runs the steps, evaluates, samples and checkpoints on schedule, resumes
exactly, and stops cleanly on SIGTERM, a collapse or running out of memory. The command
line is loopedlm.cli.train."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from loopedlm.common.compiling import RecompileLimitWatch
from loopedlm.common.distributed import (
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    setup_distributed,
)
from loopedlm.common.files import atomic_write_json
from loopedlm.model.checkpoint import CheckpointSaveError
from loopedlm.model.gpt import LoopedGPT
from loopedlm.model.head_loss import describe_head_backend
from loopedlm.train.checkpointing import restore_checkpoint, save_checkpoint
from loopedlm.train.collapse import CollapseDetector
from loopedlm.train.config import TrainConfig
from loopedlm.train.metrics import (
    PeakMemory,
    evaluate_bpb,
    grad_norms,
    peak_flops,
    watched_parameters,
)
from loopedlm.train.optim import LoopedOptimizer
from loopedlm.train.parallel import apply_activation_checkpointing, compile_blocks, wrap_ddp
from loopedlm.train.prepare import PreparedRun, prepare_run
from loopedlm.train.reporting import StepReporter
from loopedlm.train.run_log import RunLogger
from loopedlm.train.sizing import (
    expected_flops_per_token,
    horizon,
    out_of_memory_message,
)
from loopedlm.train.step_figures import StepFigures, read_steps
from loopedlm.train.termination import TerminationRequest

log = logging.getLogger(__name__)


class TrainingCollapsed(RuntimeError):
    """A non-finite loss stopped the run (the last good checkpoint is kept)."""


class TrainingOutOfMemory(RuntimeError):
    """The device (or host) ran out of memory; the last checkpoint is kept."""


# how a started run can fail, and the exit code `loopedlm train` gives each
FAILURE_EXIT_CODES: dict[type[Exception], int] = {
    TrainingCollapsed: 3, TrainingOutOfMemory: 4, CheckpointSaveError: 5}


def train(cfg: TrainConfig, *, data=None, tokenizer=None) -> dict[str, Any]:
    """Run (or resume) training; returns the run summary (also in RUN/summary.json).

    `data` (default: Parquet shards in `cfg.data_dir`) must offer `loader(tokenizer,
    batch_size, seq_len, *, split, rank, world_size, device, loop)` and, for BPE
    training, `texts()` and `data_dir`; `tokenizer` overrides `cfg.tokenizer`.
    """
    info = setup_distributed(cfg.device)
    try:
        return Trainer(prepare_run(cfg, info, data, tokenizer)).run()
    finally:
        cleanup_distributed()


def sample_text(model: LoopedGPT, tokenizer, prompt: str, max_tokens: int, *,
                temperature: float = 0.8, seed: int = 0, engine=None) -> str:
    """A short sample (KV-cached decoding through loopedlm.infer.generate), on `engine`
    (a `DecodeEngine` of `model` kept across samples; None: one for this sample)."""
    from loopedlm.infer.generate import generate, strip_trailing_spaces

    was_training = model.training
    model.eval()
    prompt = strip_trailing_spaces(prompt)
    result = generate(model, prompt, tokenizer=tokenizer, max_tokens=max_tokens,
                      temperature=temperature, seed=seed, engine=engine)
    model.train(was_training)
    return prompt + result.texts[0]


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast for `dtype` "bfloat16" (and "auto" on a GPU with bf16), else none."""
    if dtype == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use_bf16 = dtype == "bfloat16"
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class _Progress:
    """Where the loop stands (what the summary and the messages report)."""

    total_steps: int
    start_step: int
    step: int
    last_saved: int | None
    elapsed_before: float
    t_start: float
    train_loss: float | None = None
    val_bpb: float | None = None
    status: str = "completed"
    message: str = ""
    train_flops: float = 0.0  # this session's, counting the loops actually run

    def elapsed(self) -> float:
        """Seconds of training over every session of this run."""
        return self.elapsed_before + time.time() - self.t_start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One run of `train()` on a prepared run (`prepare_run`): `run()` builds the model
    and trains it step by step."""

    def __init__(self, run: PreparedRun):
        self.cfg, self.info, self.run_dir = run.cfg, run.info, run.run_dir
        self.seq_len, self.grad_accum = run.seq_len, run.grad_accum
        self.data, self.tokenizer, self.model_cfg = run.data, run.tokenizer, run.model_cfg
        self.resume_from = run.resume_from
        self.sample_engine = None  # `_sample`: one decode engine for the run's samples

    # ---- the run, step by step ----------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to the horizon (or until a collapse, SIGTERM or out of memory); returns
        the summary, also written to RUN/summary.json."""
        progress = self._build()
        self._log_plan(progress.total_steps)
        progress.t_start = time.time()
        self.reporter = StepReporter(self.cfg, self.logger, progress.total_steps,
                                     progress.start_step, progress.t_start) \
            if self.info.is_main else None
        self.memory = PeakMemory(self.info.device)
        self.train_model.train()
        self.pending: list[StepFigures] = []
        self.interval_start = time.time()
        terminate = TerminationRequest()
        watch = RecompileLimitWatch("training") if self.cfg.compile else contextlib.nullcontext()
        try:
            terminate.install()
            with watch:
                while progress.step < progress.total_steps:
                    self._step(progress)
                    if self._after_step(progress, terminate):
                        break
        except (torch.OutOfMemoryError, MemoryError) as exc:
            # the steps since the last flush (fewer than log_every) are not logged
            progress.status = "out_of_memory"
            progress.message = out_of_memory_message(exc, self.cfg, self.model_cfg,
                                                     progress.step + 1, progress.last_saved,
                                                     self.info.world_size)
            log.debug("out of memory", exc_info=True)
        finally:
            terminate.restore()
            if self.reporter is not None:
                self.reporter.close()
        return self._finish(progress)

    def _build(self) -> _Progress:
        """Model, optimiser, loader and collapse detector (restored when resuming), the
        figures the log needs; writes RUN/config.json."""
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model = self.model = LoopedGPT.from_config(self.model_cfg, device=info.device,
                                                   seed=cfg.seed)
        total_steps = horizon(cfg, model)
        self.optimizer = LoopedOptimizer(model, cfg.optim, zero=cfg.zero)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.sampler = cfg.loop_sampler(self.model_cfg.n_loops)
        model.head_options = {"backend": cfg.head_loss, "compile": cfg.compile}
        train_model = compile_blocks(model) if cfg.compile else model  # regional compile
        self.train_model = wrap_ddp(train_model, info)
        self.autocast = autocast_context(info.device, cfg.dtype)
        self.loader = self.data.loader(self.tokenizer, cfg.device_batch_size, self.seq_len,
                                       split="train", rank=info.rank,
                                       world_size=info.world_size, device=info.device)
        self.detector = CollapseDetector(cfg.collapse)
        start_step, elapsed_before = 0, 0.0
        if self.resume_from is not None:
            start_step, elapsed_before = restore_checkpoint(
                self.resume_from, info, model, self.optimizer, self.loader, self.detector)
        if info.is_main:
            atomic_write_json(self.run_dir / "config.json", {
                "train": cfg.to_dict(), "model": self.model_cfg.to_dict(),
                "world_size": info.world_size, "total_steps": total_steps,
                "grad_accum_steps": self.grad_accum})
        self.logger = RunLogger(self.run_dir, resume_step=start_step if self.resume_from
                                else None) if info.is_main else None
        self.flops_per_token = expected_flops_per_token(cfg, model)
        self.peak = peak_flops(info.device)
        self.watched = watched_parameters(model)
        self.token_bytes = self.tokenizer.token_bytes()
        return _Progress(total_steps=total_steps, start_step=start_step, step=start_step,
                         last_saved=start_step if self.resume_from is not None else None,
                         elapsed_before=elapsed_before, t_start=time.time())

    def _log_plan(self, total_steps: int) -> None:
        cfg, info = self.cfg, self.info
        if info.is_main:
            log.info("model: %s, %d params, %.3g training FLOPs/token (%s%s, every loop run "
                     "counted); %d steps of %d tokens (%d x %d x %d ranks x %d accumulation)",
                     self.model_cfg.loop_mode, self.model.num_params(), self.flops_per_token,
                     self.sampler.describe(), f", backprop through the last {cfg.backprop_loops}"
                     if cfg.backprop_loops else "", total_steps, cfg.total_batch_tokens,
                     cfg.device_batch_size, self.seq_len, info.world_size, self.grad_accum)
            log.info("LM head loss: %s", describe_head_backend(cfg.head_loss, cfg.compile))

    def _step(self, progress: _Progress) -> None:
        """One optimizer step. Its figures stay on the device (`StepFigures`) until the
        next flush: no host sync here."""
        cfg = self.cfg
        rates = self.optimizer.set_step(progress.step, progress.total_steps)
        # the same N on every rank: a function of (seed, step) only
        n_loops = self.sampler.sample(cfg.seed, progress.step)
        step_flops_per_token = self.model.estimate_flops(n_loops, cfg.backprop_loops)
        stats = self._forward_backward(n_loops)
        norms = list(grad_norms(self.watched).values())
        total_norm = None
        if cfg.grad_clip > 0:
            total_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        self.pending.append(StepFigures.pack(progress.step, n_loops, rates,
                                             step_flops_per_token, stats, total_norm, norms))

    def _flush(self, progress: _Progress) -> bool:
        """Read the pending steps (one transfer), feed the collapse detector and report
        them in order; False when one's loss is not finite (the run has collapsed: it
        stops there, and nothing after it is logged or saved)."""
        cfg, info = self.cfg, self.info
        _synchronize(info.device)
        dt = (time.time() - self.interval_start) / max(1, len(self.pending))
        pending, self.pending = self.pending, []
        for read in read_steps(pending, list(self.watched), cfg.grad_clip > 0):
            progress.train_loss = read.loss
            if not math.isfinite(read.loss):
                progress.step = read.figures.step - 1
                self._stop_collapsed(progress)
                return False
            progress.train_flops += read.figures.flops_per_token * cfg.total_batch_tokens
            events = self.detector.update(read.figures.step, read.loss, read.residual_norms)
            if info.is_main:
                self.reporter.step(read.record(cfg.total_batch_tokens, dt, self.peak,
                                               info.world_size), events)
        return True

    def _forward_backward(self, n_loops: int) -> torch.Tensor:
        """Gradients of the global batch (accumulated over micro-batches, averaged over
        ranks); returns [loss, residual norm per loop] averaged the same way."""
        info = self.info
        stats = torch.zeros(1 + n_loops, device=info.device)
        for micro in range(self.grad_accum):
            inputs, targets = self.loader.next_batch()
            sync = contextlib.nullcontext()
            if info.distributed and micro < self.grad_accum - 1:
                sync = self.train_model.no_sync()
            with sync:
                with self.autocast:
                    loss, norms = self.train_model(inputs, targets, return_residual_norms=True,
                                                   n_loops=n_loops, backprop_loops=self.cfg.backprop_loops)
                (loss / self.grad_accum).backward()
            stats += torch.cat([loss.detach().float().view(1), norms.float()])
        return all_reduce_mean(stats / self.grad_accum)

    def _stop_collapsed(self, progress: _Progress) -> None:
        self.detector.update(progress.step + 1, progress.train_loss)
        progress.status = "collapsed"
        kept = (f"step_{progress.last_saved:06d}" if progress.last_saved is not None
                else "none")
        progress.message = (f"non-finite training loss ({progress.train_loss}) at step "
                            f"{progress.step + 1}: stopping; the last good checkpoint is {kept}")
        log.error(progress.message)

    def _after_step(self, progress: _Progress, terminate: TerminationRequest) -> bool:
        """Flush the pending steps at a log point, and evaluate, sample and save on
        schedule (each after a flush); True when the run stops (a collapse or SIGTERM)."""
        cfg, info, step = self.cfg, self.info, progress.step
        last = step == progress.total_steps
        evaluate = bool(cfg.eval_every and step % cfg.eval_every == 0) or last
        sample = bool(info.is_main and cfg.sample_every and step % cfg.sample_every == 0
                      and not last)
        save = bool(cfg.save_every and step % cfg.save_every == 0) or last
        # the same on every rank: the SIGTERM agreement below is a collective
        shared_point = last or step % cfg.log_every == 0 or evaluate or save
        if shared_point or sample:
            if not self._flush(progress):
                return True
            if evaluate:
                self._validate(progress)
            if sample:
                text = self._sample()
                self.logger.write({"step": step, "sample": text})
            if save:
                self._save(progress)
            _synchronize(info.device)
            self.interval_start = time.time()
        # one process reads its SIGTERM flag at every step for free; ranks must agree
        # through a collective (a host sync), so they do at the shared points only
        if last or (info.distributed and not shared_point) or not terminate.agreed(info):
            return False
        if self.pending and not self._flush(progress):
            return True
        if progress.last_saved != step:
            self._save(progress)
        progress.status = "interrupted"
        progress.message = (f"{terminate.signal_name or 'SIGTERM'} at step {step}: saved "
                            f"checkpoint step_{step:06d}; continue with "
                            f"--run_dir={self.run_dir} --resume")
        log.warning(progress.message)
        return True

    def _sample(self) -> str:
        """A sample of the model as it is now, through one decode engine kept for the whole
        run: its cache, any cast copy and captured CUDA graphs are made once, and it takes
        the weights up as they train. No compile: samples are short."""
        if self.sample_engine is None:
            from loopedlm.infer.engine import DecodeEngine

            self.sample_engine = DecodeEngine(self.model, max_batch=1, compile=False)
        cfg = self.cfg
        return sample_text(self.model, self.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                           seed=cfg.seed, engine=self.sample_engine)

    def _validate(self, progress: _Progress) -> None:
        progress.val_bpb, val_tokens = self._evaluate()
        if self.info.is_main:
            self.reporter.validation(progress.step, progress.val_bpb, val_tokens)

    def _evaluate(self) -> tuple[float, int]:
        """Validation (bpb, counted target tokens): the first `eval_tokens` of the val split
        in (device_batch_size, sequence_len) batches; `loopedlm eval` of the checkpoint
        reads the same batches by default."""
        cfg, info = self.cfg, self.info
        loader = self.data.loader(self.tokenizer, cfg.device_batch_size, self.seq_len,
                                  split="val", rank=info.rank, world_size=info.world_size,
                                  device=info.device, loop=False)
        steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * self.seq_len * info.world_size))
        self.model.eval()
        result = evaluate_bpb(self.model, loader, self.token_bytes, steps, autocast=self.autocast,
                              details=True)
        self.model.train()
        return result["bpb"], result["tokens"]

    def _save(self, progress: _Progress) -> None:
        save_checkpoint(self.run_dir, progress.step, self.cfg, self.info, self.model,
                        self.optimizer, self.loader, self.detector, progress.elapsed())
        progress.last_saved = progress.step

    def _finish(self, progress: _Progress) -> dict[str, Any]:
        """The summary (rank 0 writes it, with a final sample when completed); raises
        TrainingCollapsed / TrainingOutOfMemory for those endings."""
        cfg, model = self.cfg, self.model
        wall = time.time() - progress.t_start
        summary = {"status": progress.status, "message": progress.message,
                   "step": progress.step, "total_steps": progress.total_steps,
                   "final_loss": progress.train_loss, "val_bpb": progress.val_bpb,
                   "wall_time_s": wall, "total_wall_time_s": progress.elapsed_before + wall,
                   "tokens": progress.step * cfg.total_batch_tokens,
                   "collapse": self.detector.summary(), "run_dir": str(self.run_dir),
                   "params": model.num_params(), "flops_per_token": self.flops_per_token,
                   "session_train_flops": progress.train_flops,
                   "loop_sampling": cfg.loop_sampling, "backprop_loops": cfg.backprop_loops,
                   **self.memory.summary()}
        if self.info.is_main:
            if progress.status == "completed":
                summary["sample"] = self._sample()
                self.logger.write({"step": progress.step, "sample": summary["sample"]})
            atomic_write_json(self.run_dir / "summary.json", summary)
            self.logger.close()
        barrier()
        if progress.status == "collapsed":
            raise TrainingCollapsed(progress.message)
        if progress.status == "out_of_memory":
            raise TrainingOutOfMemory(progress.message)
        return summary


__all__ = ["train", "Trainer", "TrainingCollapsed", "TrainingOutOfMemory", "FAILURE_EXIT_CODES",
           "sample_text",
           "autocast_context"]
