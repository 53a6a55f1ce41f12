"""Training: one loop for a CPU, one GPU or several (`accelerate launch`), resumable at any checkpoint.

    triplets -> length-grouped batches -> one encoder pass over [anchors; positives; negatives]
             -> NSALoss (temperature schedule) -> backward, accumulated over `grad_accum` micro-batches
             -> unscale (fp16) -> clip to `max_grad_norm` -> AdamW step -> cosine LR with warm-up

Mixed precision is torch's own autocast (fp16 with a GradScaler, or bf16) on whatever device runs, so
the path a GPU takes is the one the CPU tests take. A non-finite loss or gradient skips that optimizer
step and is logged and counted (the loss is never patched with nan_to_num); `max_consecutive_skips` in a
row stop the run with a message. `accelerate` places the model, wraps it for several processes and skips
gradient synchronisation inside an accumulation window; every process takes every world-th micro-batch.
Under several processes a non-finite loss on any one of them skips the step on all (one all-reduce per
micro-batch), and the parts of the model that no enabled loss term reaches are frozen, so that every
ablation flag works with DistributedDataParallel.

A checkpoint (every `save_every` optimizer steps) is a folder `ckpt-0000500/` holding the model
(config.json + model.safetensors) and trainer_state.pt (optimizer, scheduler, scaler, every RNG state,
the data position, best STS, counters), written under a temporary name and renamed, so a run killed
mid-write leaves the previous checkpoints whole. Resuming restores all of it: a run stopped at any
checkpoint and resumed gives the same per-step losses as one never stopped (CPU, fp32).

Every optimizer step appends a line to `metrics.jsonl` in the run folder (step, loss, each term, lr,
temperature, grad_norm, skipped, ...), every evaluation another; dashboards read that file.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from .backup import BackupManager, backup_target
from .config import NSAConfig
from .data import (TokenizedTriplets, TripletBatches, load_tokenizer, load_triplets, ood_fit_texts,
                   split_train_val)
from .gradcache import cached_step
from .losses import NSALoss, temperature_at, unreached_parameters
from .model import NSAModel, fit_ood_detector
from .monitor import TARGET_STS, embedding_stats, gradient_stats, health_warnings
from .runfolder import (STATE_FILE, RunFolderExists, RunLock, checkpoint_name, clear_run,  # noqa: F401
                        find_resume_checkpoint, list_checkpoints, previous_run, remove_folder, resumed_config,
                        write_folder)
from .safe_load import load_torch_file

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps in a row)."""


def rng_state() -> dict:
    """Every RNG stream, as tensors and plain Python values only, so that `weights_only=True` loads it."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple with an ndarray in checkpoints written before this layout
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# the loop


@dataclass
class TrainState:
    """Where a run is: everything besides model/optimizer/scheduler/scaler that a resume needs."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (all processes together)
    skipped: int = 0
    consecutive_skips: int = 0
    consecutive_nonfinite_losses: int = 0
    best_sts: float = -math.inf
    best_step: int = -1
    evals_without_improvement: int = 0  # for early stopping (patience in config.early_stopping_patience)
    stopped_early: bool = False
    history: list = field(default_factory=list)  # evaluation records, for the monitor


def split_outputs(out: dict, parts: int) -> list[dict]:
    """The model's outputs for [anchors; positives; negatives] stacked on the batch dim, as three dicts."""
    pieces = [dict() for _ in range(parts)]
    for key, value in out.items():
        if isinstance(value, dict):
            for sub, t in value.items():
                for piece, chunk in zip(pieces, t.chunk(parts)):
                    piece.setdefault(key, {})[sub] = chunk
        else:
            for piece, chunk in zip(pieces, value.chunk(parts)):
                piece[key] = chunk
    return pieces


class Trainer:
    """Trains an NSAModel on triplets. `Trainer(config, data="snli", output_dir="runs/x").train()`.

    Args:
        config: the model, loss and training settings (`NSAConfig`) of a new run. When resuming, the run's
            own settings are used; where `config` differs from them, the difference is applied if it may
            change on resume (steps, cadences: `runfolder.RESUME_MAY_CHANGE`) and refused otherwise.
        data: 'snli' (offline pack), 'msmarco' (Hub) or the path of a local triplet file.
        output_dir: the run folder: checkpoints/, metrics.jsonl, config.json, best/, final/. One writer at
            a time: a second trainer on the same folder raises `RunFolderBusy`.
        resume: None (a new run), 'auto' (the newest whole checkpoint in output_dir or in the backup; a
            new run if there is none) or a checkpoint folder.
        overwrite: with `resume=None`, replace a run that output_dir already holds (else `RunFolderExists`).
        config_overrides: instead of comparing `config`, only these fields (field -> value) are asked of a
            resumed run (the command line passes the flags given explicitly).
        backup: where to copy a checkpoint every `config.backup_every` steps, at the end and on an interrupt:
            a `FolderTarget`, a `DriveTarget`, or a string for `backup_target` (a folder or 'gdrive:<id>').
        checkpoint_dir: where working checkpoints go (default output_dir/checkpoints); in Colab, fast local
            disk while output_dir (metrics, best/, final/) and the backups are on Drive.
        init_from: a new run starts from this pretrained BERT-family encoder (`NSAModel.from_pretrained_encoder`;
            `config` must then be its config, e.g. from `warmstart.config_for_encoder`). Ignored on resume.
        callbacks: called with each metrics record (dict) as it is written, e.g. a live dashboard.
        eval_fn: `eval_fn(model, tokenizer) -> dict` run every `config.eval_every` steps on the main
            process; its 'sts' value tracks the best model (kept in best/). Default: the quick STS-B check.
        max_consecutive_skips: skipped steps in a row (non-finite loss or gradient) that stop the run.
        max_nonfinite_losses: steps in a row with a non-finite loss that stop the run (fewer: unlike an
            fp16 gradient overflow, which the grad scaler corrects, a non-finite loss does not heal).

    Nothing is written to output_dir before the checkpoint being resumed has loaded.
    """

    def __init__(self, config: NSAConfig, *, data: str = "snli", output_dir: str | Path = "runs/nsa",
                 resume: str | None = None, overwrite: bool = False, config_overrides: dict | None = None,
                 callbacks: tuple[Callable[[dict], None], ...] = (), eval_fn: Callable | None = None,
                 keep_checkpoints: int = 3, max_consecutive_skips: int = 20, max_nonfinite_losses: int = 3,
                 backup=None, backup_keep: int = 3, tokenizer=None, triplets=None, show_progress: bool = True,
                 checkpoint_dir: str | Path | None = None, init_from: str | Path | None = None):
        from accelerate import Accelerator

        self.output_dir = Path(output_dir)
        self.init_from = init_from
        self.data_name = str(data) if triplets is None else "triplets given in code"  # for the model card
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else self.output_dir / "checkpoints"
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ValueError(f"--output-dir {self.output_dir} is a file; give a folder (new or a run's)")
        self.callbacks = list(callbacks)
        self.keep_checkpoints = keep_checkpoints
        self.max_consecutive_skips = max_consecutive_skips
        self.max_nonfinite_losses = max_nonfinite_losses
        self.show_progress = show_progress
        self.backup_results: list = []
        self._best_needs_backup = False
        self._window = None  # (state, RNG) at the start of the optimizer step in progress
        # mixed precision is ours (torch autocast); cpu=True where no accelerator is present, so that several
        # CPU processes (torchrun / accelerate launch) form a gloo process group
        no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
        self.accelerator = Accelerator(mixed_precision="no", cpu=no_accelerator)
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.state = TrainState()
        self.lock = RunLock(self.output_dir)
        self._on_main(self.lock.acquire)  # the ranks of one run are one writer
        try:
            target = backup_target(backup) if isinstance(backup, str) else backup
            self.backups = BackupManager(target, keep=backup_keep) if target is not None else None
            checkpoint = self._resume_point(resume, overwrite)
            if checkpoint is not None:
                saved = NSAConfig.from_json(checkpoint / "config.json")
                requested = config_overrides if config_overrides is not None else _differences(config, saved)
                config = resumed_config(saved, requested)
            self.config = config
            torch.manual_seed(config.seed)
            random.seed(config.seed)
            np.random.seed(config.seed)
            self._build_batches(data, tokenizer, triplets)
            self._build_model_and_optimizer()
            self.eval_fn = eval_fn if eval_fn is not None else default_eval_fn(config)
            if checkpoint is not None:
                self.load_checkpoint(checkpoint)
            if self.accelerator.is_main_process:  # only now that the checkpoint has loaded
                config.to_json(self.output_dir / "config.json")
                if checkpoint is not None:  # the dashboard drops the records of steps after this one
                    self._log({"step": self.state.step, "resumed_from": checkpoint.name, "time": time.time()})
        except BaseException:
            self.lock.release()
            raise

    def _on_main(self, fn: Callable[[], object]):
        """Run `fn` on the main process; every process gets its result, or raises the error it raised."""
        result, error = None, None
        if self.accelerator.is_main_process:
            try:
                result = fn()
            except Exception as e:  # re-raised on every process below, so that no process waits forever
                error = e
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            box = [result, None if error is None else (type(error), str(error))]
            broadcast_object_list(box)
            result, raised = box
            if raised is not None and error is None:
                error = raised[0](raised[1])
        if error is not None:
            raise error
        return result

    def _resume_point(self, resume: str | None, overwrite: bool) -> Path | None:
        """The verified checkpoint to resume from (restored from the backup if needed, on the main process),
        or None for a new run, after checking that a new run does not silently replace an old one."""
        def on_main():
            checkpoint = find_resume_checkpoint(resume, self.checkpoint_dir, restore_into=self.checkpoint_dir,
                                                backup_target=self.backups.target if self.backups else None)
            if checkpoint is None and resume is None:
                found = previous_run(self.output_dir, self.checkpoint_dir)
                if found and not overwrite:
                    raise RunFolderExists(
                        f"{self.output_dir} already holds a run ({', '.join(found)}). Continue it with --resume "
                        f"auto, train into a new --output-dir, or pass --overwrite to replace it.")
                if found:
                    logger.warning("--overwrite: removing the earlier run in %s (%s)", self.output_dir, ", ".join(found))
                    clear_run(self.output_dir, self.checkpoint_dir)
            if checkpoint is None and resume == "auto":
                logger.info("no checkpoint to resume from in %s%s: a new run", self.output_dir,
                            f" or {self.backups.target}" if self.backups else "")
            return None if checkpoint is None else str(checkpoint)

        found = self._on_main(on_main)
        return None if found is None else Path(found)

    def _build_batches(self, data: str, tokenizer, triplets) -> None:
        """Tokenizer, train/validation split, length-grouped batches, and the number of optimizer steps."""
        c = self.config
        if tokenizer is None and self.init_from:  # a warm start reads text as its encoder did
            from .warmstart import encoder_tokenizer

            tokenizer = encoder_tokenizer(self.init_from)
        self.tokenizer = tokenizer or load_tokenizer()
        triplets = triplets if triplets is not None else load_triplets(data, max_samples=c.max_train_samples, seed=c.seed)
        train, self.val_triplets = split_train_val(triplets, c.val_ratio, c.seed)
        self._ood_texts = ood_fit_texts(train, self.val_triplets, c.ood_fit_texts, c.seed)
        tokenized = TokenizedTriplets.build(train, self.tokenizer, c.max_length)
        self.batches = TripletBatches(tokenized, c.batch_train, seed=c.seed, pad_id=self.tokenizer.pad_token_id or 0,
                                      group_factor=50 if c.group_by_length else 1)
        per_epoch = len(self.batches) // (c.grad_accum * self.world)
        if per_epoch == 0:
            raise ValueError(f"{len(train)} training triplets make no optimizer step of "
                             f"{c.batch_train} x {c.grad_accum} x {self.world} processes")
        self.steps_per_epoch = per_epoch
        self.total_steps = c.max_steps or c.epochs * per_epoch

    def _build_model_and_optimizer(self) -> None:
        """The model (its loss-less parts frozen), AdamW (no decay on biases, norms, embeddings), the cosine
        schedule, the loss, and the fp16 grad scaler; the model placed and wrapped by accelerate."""
        c = self.config
        # a warm start copies the encoder's weights in (a resumed run's come from its checkpoint just after)
        model = NSAModel.from_pretrained_encoder(self.init_from, **c.to_dict()) if self.init_from else NSAModel(c)
        # a part that no enabled loss term reaches gets no gradient, which DistributedDataParallel treats as
        # an error; frozen, it is left out of the reduction (and AdamW never touches it)
        frozen = unreached_parameters(c)
        for name, p in model.named_parameters():
            if name.startswith(frozen):
                p.requires_grad_(False)
        # four groups: weight decay or not (biases, norms, embeddings) x pretrained (backbone_lr) or new (lr);
        # the schedule scales every group's learning rate by the same factor
        pretrained = set(model.pretrained_parameter_names())
        self._pretrained_params = [p for n, p in model.named_parameters() if n in pretrained]
        groups = []
        for is_pretrained, lr in ((True, c.backbone_lr or c.lr), (False, c.lr)):
            named = [(n, p) for n, p in model.named_parameters() if (n in pretrained) == is_pretrained]
            decay = [p for n, p in named if p.ndim >= 2 and "emb" not in n]
            no_decay = [p for n, p in named if not (p.ndim >= 2 and "emb" not in n)]
            groups += [{"params": decay, "weight_decay": c.weight_decay, "lr": lr},
                       {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=c.lr, betas=c.betas,
                                           fused=_fused_adamw_supported(self.device))
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, round(c.warmup_ratio * self.total_steps), self.total_steps)
        self.loss_fn = NSALoss(c)
        self.model = self.accelerator.prepare(model)
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(c.precision)
        # fp16: a starting scale of 2^10, not 2^16, so that the first steps do not overflow and get skipped
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0 ** 10, enabled=c.precision == "fp16")

    # persistence

    @property
    def checkpoint_dir(self) -> Path:
        return self._checkpoint_dir

    def save_checkpoint(self) -> Path | None:
        """Write ckpt-<step>/ (model, trainer state, manifest last) under a temporary name, then rename it;
        prune to `keep_checkpoints` newest plus the best. A failed write (a full disk) leaves no partial folder."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        model = self.accelerator.unwrap_model(self.model)

        def fill(folder: Path) -> None:
            model.save_pretrained(folder)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(), "rng": rng_state(), "state": self.state.__dict__,
                        "total_steps": self.total_steps}, folder / STATE_FILE)

        final = write_folder(self.checkpoint_dir / checkpoint_name(self.state.step), fill)
        self._prune()
        return final

    def save_model(self, name: str, extra: dict | None = None) -> Path:
        """The current model as `output_dir/<name>/` (config.json, model.safetensors, the `extra` JSON files,
        manifest.json), written whole or not at all. Used for best/ and final/ (main process only)."""
        model = self.accelerator.unwrap_model(self.model)
        detector, extra = None, dict(extra or {})
        if self._ood_texts is not None:  # the saved model gets an OOD detector; the one in training does not
            try:
                detector, stats = fit_ood_detector(model, *self._ood_texts, seed=self.config.seed,
                                                   tokenizer=self.tokenizer, show_progress=False)
                extra["ood.json"] = stats
            except (ValueError, RuntimeError) as e:  # e.g. a diverged model: the model is saved all the same
                logger.warning("%s/ is saved without an OOD detector: %s", name, e)

        def fill(folder: Path) -> None:
            model.attach_ood(detector)
            try:
                model.save_pretrained(folder, tokenizer=self.tokenizer)  # a model folder reads text by itself
            finally:
                model.attach_ood(None)
            for file, content in extra.items():
                (folder / file).write_text(json.dumps(content))

        return write_folder(self.output_dir / name, fill)

    def _prune(self) -> None:
        keep = set(list_checkpoints(self.checkpoint_dir)[-self.keep_checkpoints:])
        best = self.checkpoint_dir / checkpoint_name(self.state.best_step)
        for ckpt in list_checkpoints(self.checkpoint_dir):
            if ckpt not in keep and ckpt != best:
                remove_folder(ckpt)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, scaler, counters and RNG streams from a checkpoint folder."""
        path = Path(path)
        saved = load_torch_file(path / STATE_FILE, what="trainer state")  # never unpickles code (Drive backups)
        model = NSAModel.from_pretrained(path)
        self.accelerator.unwrap_model(self.model).load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.state = TrainState(**saved["state"])
        set_rng_state(saved["rng"])
        logger.info("resumed from %s at step %d", path, self.state.step)

    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for callback in self.callbacks:
            callback(record)

    # the loop

    def _micro_batches(self):
        """(epoch, index in epoch, batch) from the current position; each process takes every world-th."""
        while True:
            order = self.batches.batches(self.state.epoch)
            usable = len(order) - len(order) % (self.config.grad_accum * self.world)
            for i in range(self.state.batch_in_epoch, usable):
                if i % self.world == self.accelerator.process_index:
                    yield i, self.batches.collate(order[i])
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def train(self) -> TrainState:
        """Run until `total_steps` optimizer steps, then save the model as `final/`; returns the final state.
        The run folder's lock is held throughout and released at the end, also on an error."""
        from tqdm.auto import tqdm

        self._on_main(self.lock.acquire)  # again, if an earlier train() released it
        try:
            self.model.train()
            bar = tqdm(total=self.total_steps, initial=self.state.step, desc="training", dynamic_ncols=True,
                       mininterval=2.0, disable=not (self.show_progress and self.accelerator.is_main_process))
            micro = self._micro_batches()
            try:
                while self.state.step < self.total_steps:
                    record = self._optimizer_step(micro)
                    self._log(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    T=f"{record['temperature']:.3f}")
                    self._stop_if_stuck()
                    self._evaluate_save_and_back_up()
                    if self.state.stopped_early:
                        logger.warning("early stopping at step %d: no better STS in %d evaluations", self.state.step,
                                       self.state.evals_without_improvement)
                        break
            except KeyboardInterrupt:  # the user stopped the cell: keep everything up to the last whole step
                logger.warning("interrupted at step %d: saving a checkpoint, backing it up and writing final/",
                               self.state.step)
                self._finish(complete=False)
                raise
            finally:
                bar.close()
            self._finish(complete=True)
        finally:
            self.lock.release()
        return self.state

    def _finish(self, *, complete: bool) -> None:
        """The end of training, or of an interrupted one: a checkpoint of the last whole optimizer step (if
        that step has none yet) copied to the backup whatever `backup_every` says, then `final/`."""
        if self._window is not None:  # interrupted inside an accumulation window: back to its start
            self.state, saved_rng = self._window
            set_rng_state(saved_rng)
            self.optimizer.zero_grad(set_to_none=True)
            self._window = None
        checkpoint = self.checkpoint_dir / checkpoint_name(self.state.step)
        # decided on the main process (the one that writes): every process then takes the same barriers
        if self._on_main(lambda: self.state.step > 0 and not checkpoint.is_dir()):
            checkpoint = self.save_checkpoint()
        if self.accelerator.is_main_process and checkpoint is not None and checkpoint.is_dir() \
                and self.backups is not None:
            last = self.backup_results[-1].name if self.backup_results else None
            if last != checkpoint.name:
                self._back_up(checkpoint)
        if self.accelerator.is_main_process:
            final = self.save_model("final", extra={"final.json": {
                "step": self.state.step, "total_steps": self.total_steps, "complete": complete,
                "data": self.data_name, "init_from": str(self.init_from) if self.init_from else None}})
            logger.info("final model (step %d of %d) in %s", self.state.step, self.total_steps, final)
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Release the run folder and the memory this trainer holds (model, optimizer, gradients), e.g.
        before a notebook cell builds another trainer. The trainer cannot train after this."""
        self.lock.release()
        for name in ("model", "optimizer", "scheduler", "scaler", "loss_fn"):
            self.__dict__.pop(name, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def final_dir(self) -> Path:
        return self.output_dir / "final"

    def _stop_if_stuck(self) -> None:
        s = self.state
        if s.consecutive_nonfinite_losses >= self.max_nonfinite_losses:
            raise TrainingStopped(f"{s.consecutive_nonfinite_losses} optimizer steps in a row had a non-finite loss "
                                  f"(last at step {s.step}): the weights have diverged; lower --lr (it is "
                                  f"{self.config.lr:g}) and resume from an earlier checkpoint, or start again")
        if s.consecutive_skips >= self.max_consecutive_skips:
            raise TrainingStopped(f"{s.consecutive_skips} optimizer steps in a row had a non-finite loss or "
                                  f"gradient (last at step {s.step}); lower --lr, or use --precision bf16 / no "
                                  f"instead of fp16")

    def _optimizer_step(self, micro) -> dict:
        """Accumulate `grad_accum` micro-batches, then clip and step (or skip a non-finite step); returns the
        step's metrics record."""
        c, started = self.config, time.perf_counter()
        # where this step starts: an interrupt inside the window saves this, not a half-consumed window
        self._window = (TrainState(**copy.deepcopy(self.state.__dict__)), rng_state())
        temperature = temperature_at(self.state.step, self.total_steps, c)
        window_ok, window_terms = True, []
        for k in range(c.grad_accum):
            index, batch = next(micro)
            last = k == c.grad_accum - 1
            ok, terms, anchors = self._accumulate(batch, temperature, sync=last)
            window_ok &= ok
            window_terms.append(terms)
            self.state.batch_in_epoch = (index // self.world + 1) * self.world  # next window's start
        if self.state.step < c.freeze_backbone_steps:  # AdamW skips parameters without a gradient: no update
            for p in self._pretrained_params:
                p.grad = None
        self.scaler.unscale_(self.optimizer)
        health = {**gradient_stats(self.model.named_parameters()), **embedding_stats(anchors)}
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm))
        skipped = not window_ok or not math.isfinite(grad_norm)  # the same on every process (see _accumulate)
        self.state.consecutive_nonfinite_losses = 0 if window_ok else self.state.consecutive_nonfinite_losses + 1
        if skipped:
            self.scaler.update()  # lowers the fp16 scale when the gradients overflowed
            self.state.skipped += 1
            self.state.consecutive_skips += 1
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.state.consecutive_skips = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self._window = None
        record = {"step": self.state.step, "epoch": self.state.epoch, "time": time.time(),
                  **{k: _mean(r[k] for r in window_terms) for k in window_terms[0]},
                  "lr": self.scheduler.get_last_lr()[0], "temperature": temperature, "grad_norm": grad_norm,
                  "skipped": skipped, "skipped_total": self.state.skipped,
                  "triplets_per_s": c.batch_train * c.grad_accum * self.world / (time.perf_counter() - started),
                  **health}
        record["warnings"] = health_warnings(record, c, c.batch_train)
        for warning in record["warnings"]:
            logger.warning("step %d: %s", self.state.step, warning)
        return record

    def _accumulate(self, batch: dict, temperature: float, *, sync: bool) -> tuple[bool, dict, dict]:
        """Forward one micro-batch and backpropagate its share of the loss; gradients are synchronised
        across processes only when `sync` (the window's last micro-batch).

        Whether the loss is finite is decided on all processes together (an all-reduce): if any process has
        a non-finite term, every process skips this backward pass, so DistributedDataParallel never waits
        for a process that did not run one, and every process skips the same optimizer step.
        Returns (finite everywhere, the loss terms as floats, the anchors' outputs)."""
        c, model = self.config, self.model
        batch = {key: t.to(self.device) for key, t in batch.items()}
        if c.mini_batch_size and c.mini_batch_size < batch["input_ids"].shape[0]:
            return self._accumulate_cached(batch, temperature, sync=sync)
        with self.accelerator.no_sync(model) if not sync else nullcontext():
            with self._autocast():
                parts = split_outputs(model(**batch), 3)
                loss = self.loss_fn(*parts, temperature=temperature)
            ok = self._finite_everywhere(loss)
            if ok:
                self.scaler.scale(loss.total / c.grad_accum).backward()
        return ok, loss.as_floats(), parts[0]

    def _accumulate_cached(self, batch: dict, temperature: float, *, sync: bool) -> tuple[bool, dict, dict]:
        """`_accumulate` with GradCache (nsa_lib.gradcache): forwards of `mini_batch_size` sequences, the
        losses on the whole micro-batch, the same gradients."""
        c, model = self.config, self.model
        with self.accelerator.no_sync(model) if not sync else nullcontext():
            loss, outputs, ok = cached_step(
                model, batch, lambda out: self.loss_fn(*split_outputs(out, 3), temperature=temperature),
                c.mini_batch_size, backward_scale=lambda total: self.scaler.scale(total / c.grad_accum),
                autocast=self._autocast, no_sync=lambda: self.accelerator.no_sync(model),
                decide=self._finite_everywhere)
        return ok, loss.as_floats(), split_outputs(outputs, 3)[0]

    def _autocast(self):
        """torch autocast to the run's precision (a no-op for 'no')."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _finite_everywhere(self, loss) -> bool:
        """Whether every loss term is finite on every process (one all-reduce); a non-finite one is logged."""
        bad = loss.nonfinite_terms()
        if bad:
            logger.warning("step %d: non-finite loss term(s) %s; the step will be skipped", self.state.step, bad)
        return not self._any_process(bool(bad))

    def _any_process(self, flag: bool) -> bool:
        """Whether `flag` is True on any process (one all-reduce; no communication with one process)."""
        if self.world == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), reduction="sum").item())

    def _evaluate_save_and_back_up(self) -> None:
        """After an optimizer step: the quick evaluation, the checkpoint and the backup, each when due."""
        c, step = self.config, self.state.step
        if c.eval_every and step % c.eval_every == 0:
            self.evaluate()
        backup_due = self.backups is not None and c.backup_every and step % c.backup_every == 0
        if c.save_every and step % c.save_every == 0 or self.state.stopped_early or backup_due:
            checkpoint = self.save_checkpoint()
            if backup_due and checkpoint is not None:
                self._back_up(checkpoint)

    def _back_up(self, checkpoint: Path) -> None:
        """Copy the checkpoint (keeping the best step's backup when pruning) and, if it changed since the
        last backup, best/; each result goes to metrics.jsonl and `backup_results`."""
        results = [self.backups.backup(checkpoint, keep_step=self.state.best_step)]
        best = self.output_dir / "best"
        if self._best_needs_backup and best.is_dir() and not self._backups_inside_run_folder():
            results.append(self.backups.backup(best, name="best"))
            self._best_needs_backup = not results[-1].ok
        for result in results:
            self.backup_results.append(result)
            self._log({"step": self.state.step, "backup": result.__dict__, "target": repr(self.backups.target)})

    def _backups_inside_run_folder(self) -> bool:
        """Backups that live inside output_dir (the Drive layout: <run>/backups/) already sit next to best/."""
        root = getattr(self.backups.target, "root", None)
        return root is not None and Path(root).resolve().is_relative_to(self.output_dir.resolve())

    def evaluate(self) -> dict:
        """Run `eval_fn` on the main process, log it, and track the best STS; every process learns whether
        to stop early."""
        result: dict = {}
        if self.accelerator.is_main_process and self.eval_fn is not None:
            # the evaluation must not move the training RNG streams (resumed runs must match)
            saved = rng_state()
            result = self.eval_fn(self.accelerator.unwrap_model(self.model), self.tokenizer)
            set_rng_state(saved)
            if "sts" in result:
                if result["sts"] > self.state.best_sts:
                    self.state.best_sts, self.state.best_step = result["sts"], self.state.step
                    self.state.evals_without_improvement = 0
                    # whatever save_every is: the best model is never pruned away
                    self.save_model("best", extra={"best.json": {"step": self.state.best_step,
                                                                 "sts": self.state.best_sts, "data": self.data_name}})
                    self._best_needs_backup = True
                else:
                    self.state.evals_without_improvement += 1
                    self.state.stopped_early = (self.state.evals_without_improvement
                                                >= self.config.early_stopping_patience)
            record = {"step": self.state.step, "eval": result, "best_sts": self.state.best_sts,
                      "best_step": self.state.best_step}
            self.state.history.append(record)
            self._log(record)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            flags = [self.state.stopped_early, self.state.best_step]
            broadcast_object_list(flags)
            self.state.stopped_early, self.state.best_step = flags
        return result


def _fused_adamw_supported(device: torch.device) -> bool:
    """torch's fused AdamW (one kernel for all parameters: 4x faster than the default on a CPU here) runs on
    CPU and CUDA (torch >= 2.4; requirements ask for 2.6)."""
    return device.type in ("cpu", "cuda")


def _differences(config: NSAConfig, saved: NSAConfig) -> dict:
    """The fields where `config` differs from `saved`: what a caller asks of a resumed run."""
    ours, theirs = config.to_dict(), saved.to_dict()
    return {k: v for k, v in ours.items() if theirs.get(k) != v}


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values))


def default_eval_fn(config: NSAConfig, with_baseline: bool = True) -> Callable:
    """The original's quick check: STS-B Spearman on `config.eval_pairs` shuffled pairs (seed 42) of the dev
    set (the original took test pairs: `quick_sts_pairs`), with `embedding_semantic` at its largest dim;
    next to it the baseline all-MiniLM-L6-v2 scored on the same pairs (measured once, when sentence-transformers is installed) and the original's target."""
    from .evaluate import baseline_encoder, nsa_encoder, quick_sts_pairs, sts_spearman

    pairs = quick_sts_pairs(config.eval_pairs)
    cached: dict = {}

    def run(model, tokenizer) -> dict:
        result = {"sts": sts_spearman(nsa_encoder(model, tokenizer), pairs)}
        if with_baseline and "baseline" not in cached:
            try:
                cached["baseline"] = sts_spearman(baseline_encoder(), pairs)
            except Exception as e:  # no sentence-transformers / no offline package: report, do not stop training
                logger.warning("baseline for the STS comparison unavailable: %s", e)
                cached["baseline"] = None
        if cached.get("baseline") is not None:
            result["baseline_sts"] = cached["baseline"]
        if config.size in TARGET_STS:
            result["target_sts"] = TARGET_STS[config.size]
        return result

    return run
