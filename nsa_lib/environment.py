"""Where a notebook runs and what it should do there: Colab or not, which accelerator, the run folder on
Drive that the notebooks share, and a plan (preset and steps) that finishes in the time given.

    env = detect_environment()                 # Colab? GPU, TPU or CPU? CI smoke mode?
    drive, note = mount_drive()                # MyDrive (Colab), $NSA_FAKE_DRIVE (tests, CI), or None
    run = RunPaths.for_run("run1", drive)      # MyDrive/spectra-nsa/run1/ (or runs/run1/ without Drive)
    plan = plan_run(env, hours=3)              # preset, precision and steps timed on this hardware
    save_run_config(run, {...}); read_run_config(run)   # 01_setup writes it, 02 and 03 read it, by name

In Colab every notebook, and every reconnect, gets a fresh runtime with an empty disk: Drive is the only
thing runtimes share. So a run is one folder on Drive holding run_config.json, metrics.jsonl, the
backups, best/ and final/; working checkpoints stay on the runtime's fast local disk (`RunPaths.work`)
and reach Drive as backups. `NSA_FAKE_DRIVE=<folder>` makes that folder stand for MyDrive, through the
same code path as the real mount, so that tests and CI run the notebooks as separate runtimes sharing
only it.

Nothing here imports Colab at module level: `google.colab` is only touched inside `mount_drive`.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import largest_preset_that_fits

logger = logging.getLogger(__name__)

DRIVE_ROOT = Path("/content/drive")
RUN_CONFIG_FILE = "run_config.json"
PROJECT_FOLDER = "spectra-nsa"  # MyDrive/spectra-nsa/<run name>/


@dataclass
class Environment:
    in_colab: bool
    smoke: bool  # CI set: tiny preset, a handful of steps, offline data, same code path
    gpu_name: str | None
    gpu_memory_bytes: int | None
    bf16_supported: bool
    cpu_count: int
    tpu: bool = False  # a Colab TPU runtime: this project does not train on TPUs

    def describe(self) -> str:
        if self.gpu_name:
            device = f"{self.gpu_name} ({self.gpu_memory_bytes / 2**30:.1f} GiB)"
        elif self.tpu:
            device = "a TPU runtime (not used: training runs on the CPU, ~100x slower than a GPU)"
        else:
            device = "no GPU (training runs on the CPU, ~100x slower than a GPU)"
        return (f"{'Colab' if self.in_colab else 'local machine'}, {device}, {self.cpu_count} CPU cores"
                + (", CI smoke mode" if self.smoke else ""))


def detect_environment() -> Environment:
    gpu = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if gpu else None
    tpu = bool(os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME") or Path("/dev/accel0").exists())
    return Environment(in_colab="google.colab" in sys.modules, smoke=bool(os.environ.get("CI")),
                       gpu_name=props.name if props else None, gpu_memory_bytes=props.total_memory if props else None,
                       bf16_supported=bool(gpu and torch.cuda.is_bf16_supported()), cpu_count=os.cpu_count() or 1,
                       tpu=tpu)


def choose_preset(env: Environment) -> tuple[str, str, bool]:
    """(preset, precision, gradient_checkpointing) for this machine: tiny in smoke mode, mini on a CPU,
    else the largest preset whose training step fits in 85% of the GPU's memory (bf16 where supported)."""
    if env.smoke:
        return "tiny", "no", False
    if env.gpu_memory_bytes is None:
        return "mini", "no", False
    precision = "bf16" if env.bf16_supported else "fp16"
    name, checkpointing = largest_preset_that_fits(env.gpu_memory_bytes, precision=precision,
                                                   candidates=("M1B", "M700", "M600", "M456", "mini"))
    return name, precision, checkpointing


# a plan that finishes

PLAN_MARGIN = 0.85  # of the time given, for training steps; the rest for evaluations, checkpoints, backups
MIN_STEPS = 2000  # fewer optimizer steps than this teach a from-scratch preset little: take a smaller one
# a pretrained encoder needs far fewer steps than a new one; past this, more time adds little and overfits
# the offline SNLI set (850 steps per epoch of 32 triplets), so a warm start's plan stops here
WARM_START_MAX_STEPS = 10_000
FROM_SCRATCH = ("", "none", "none (from scratch)")


def base_model_name(value: str | None) -> str | None:
    """A notebook's BASE_MODEL field as `init_from`: None for "none" / "none (from scratch)" / empty."""
    value = (value or "").strip()
    return None if value.lower() in FROM_SCRATCH else value


@dataclass
class Plan:
    """What to train in the time given, and why: `reason` is the sentence a notebook prints."""

    preset: str
    precision: str
    gradient_checkpointing: bool
    max_steps: int
    seconds_per_step: float
    reason: str
    base_model: str | None = None  # a warm start's pretrained encoder (preset is then "custom")


@functools.lru_cache(maxsize=4)
def _sample_triplets(data: str, count: int, seed: int) -> tuple:
    """Read once per plan: each candidate preset is timed on the same sample (MS MARCO streams it)."""
    from .data import load_triplets

    return tuple(load_triplets(data, max_samples=count, seed=seed))


def run_batches(config, data: str, count: int, *, base_model: str | None = None, seed: int = 0) -> list[dict]:
    """`count` batches of `data` ("snli", "msmarco" or a triplet file) as a run of `config` draws them:
    read by its tokenizer (the encoder's for a warm start), truncated to its max_length, batched by
    TripletBatches (length-grouped if the config says so), padded by its collate. Of a sample of 50
    batches' worth of triplets (so that length grouping groups as in training), the batches at evenly
    spaced quantiles of their padded size: a few of them cost what an average batch costs, where a few
    drawn at random from length-grouped batches (short ones and long ones) are off by half."""
    from .data import TokenizedTriplets, TripletBatches, load_tokenizer

    if base_model:
        from .warmstart import encoder_tokenizer

        tokenizer = encoder_tokenizer(base_model)
    else:
        tokenizer = load_tokenizer()
    triplets = _sample_triplets(data, max(50 * config.batch_train, 512), seed)
    tokenized = TokenizedTriplets.build(triplets, tokenizer, config.max_length)
    batches = TripletBatches(tokenized, config.batch_train, seed=seed, pad_id=tokenizer.pad_token_id or 0,
                             group_factor=50 if config.group_by_length else 1)
    drawn = [batches.collate(b) for b in batches.batches(0)]
    if not drawn:
        raise ValueError(f"{data}: {len(triplets)} triplets make no batch of {config.batch_train}")
    drawn.sort(key=lambda b: b["input_ids"].numel())
    return [drawn[int((i + 0.5) / count * len(drawn))] for i in range(count)]


def seconds_per_step(preset: str | None, precision: str, gradient_checkpointing: bool, *, base_model: str | None = None,
                     data: str | None = None, timed: int = 2, warmup: int = 1) -> float:
    """Seconds per optimizer step of `preset` (or of a warm start from `base_model`: its shapes and batch)
    on this machine's accelerator (or CPU), measured: the model, AdamW and the seven losses at the
    config's batch and accumulation, on batches of the run's `data` as its trainer draws them
    (`run_batches`: the model's per-token layers see only real tokens, so a step's time follows the
    data's lengths), or without `data` on random tokens at the config's max_length (the longest step)."""
    from .losses import NSALoss
    from .model import NSAModel
    from .trainer import split_outputs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = training_config({"preset": preset, "base_model": base_model}, precision=precision,
                             gradient_checkpointing=gradient_checkpointing)
    micro = timed * config.grad_accum
    if data is None:
        ids = torch.randint(1000, config.vocab_size, (3 * config.batch_train, config.max_length))
        batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}] * micro
    else:
        batches = run_batches(config, data, micro, base_model=base_model)
    largest = max(batches, key=lambda b: b["input_ids"].numel())  # warm-up: the largest, allocating once
    batches = [{k: v.to(device) for k, v in b.items()} for b in [largest] * warmup * config.grad_accum + batches]
    model = NSAModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    loss_fn = NSALoss(config, gather=False)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    feed = iter(batches)

    def step():
        for _ in range(config.grad_accum):
            batch = next(feed)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(*split_outputs(model(**batch), 3), temperature=0.07)
            scaler.scale(loss.total / config.grad_accum).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(timed):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / timed  # the model and optimizer are freed on return


def training_config(settings: dict, **options):
    """The NSAConfig of a run from its settings (run_config.json: `base_model` for a warm start, else
    `preset`) with `options` (steps, cadences, toggles, precision) applied."""
    from .config import NSAConfig

    if settings.get("base_model"):
        from .warmstart import encoder_config

        return encoder_config(settings["base_model"], **options)
    return NSAConfig.from_preset(settings["preset"], **options)


def plan_run(env: Environment, hours: float, *, preset: str | None = None, base_model: str | None = None,
             data: str | None = None, smoke_steps: int = 6) -> Plan:
    """What to train in `hours` (PLAN_MARGIN of it) on this machine, from a few steps timed here.

    With `base_model` (a warm start, e.g. "all-MiniLM-L6-v2"): that encoder, in bf16 / fp16 on a GPU (fp32
    on a CPU), with as many steps as fit, at most WARM_START_MAX_STEPS. Otherwise the largest preset that
    fits and trains at least MIN_STEPS steps: on a GPU the presets whose training step fits its memory,
    largest first; on a CPU or TPU runtime `mini` then `tiny` (said as such); `preset` fixes the preset
    (the steps are still planned for `hours`). In smoke mode (CI): `smoke_steps` steps of the base model,
    or of `tiny`, through the same timing code.

    Steps are timed on batches of the run's `data` ("snli", "msmarco" or a triplet file), as its trainer
    draws them: a step's time follows the data's token lengths (a warm start from all-MiniLM-L6-v2 on
    SNLI takes ~0.7 s per step on 2 CPU cores, ~26 s on random tokens at its max_length of 256). Without
    `data`, on random tokens at max_length: the longest step, and a plan of that many fewer steps.
    """
    if hours <= 0:
        raise ValueError(f"HOURS must be positive, got {hours}")
    budget = hours * 3600 * PLAN_MARGIN
    if base_model:
        return _plan_warm_start(env, base_model, hours, budget, smoke_steps, data)
    if env.smoke:
        spent = seconds_per_step("tiny", "no", False, data=data, timed=1, warmup=1)
        return Plan("tiny", "no", False, smoke_steps, spent,
                    f"CI smoke mode: tiny, {smoke_steps} steps ({spent:.2f} s per step measured here)")
    if env.gpu_memory_bytes is None:
        candidates = [("mini", "no", False), ("tiny", "no", False)]
        where = "no GPU on this runtime" + (" (a TPU runtime: not used by this project)" if env.tpu else "")
    else:
        best, precision, checkpointing = choose_preset(env)  # the largest that fits, and its precision
        order = ["M1B", "M700", "M600", "M456", "mini"]
        candidates = [(name, precision, checkpointing if name == best else False) for name in order[order.index(best):]]
        where = f"{env.gpu_name}, {precision}"
    if preset is not None:
        from .config import NSAConfig

        name, precision = NSAConfig.from_preset(preset).size, candidates[0][1]
        checkpointing = False
        if env.gpu_memory_bytes is not None:  # checkpointing on if the step only fits with it (or not at all)
            checkpointing = largest_preset_that_fits(env.gpu_memory_bytes, precision=precision, candidates=(name,))[1]
        candidates = [(name, precision, checkpointing)]
        where += f", preset {name} as asked"
    tried = []
    for name, precision, checkpointing in candidates:
        per_step = seconds_per_step(name, precision, checkpointing, data=data)
        steps = int(budget / per_step)
        tried.append(f"{name} {per_step:.2f} s/step")
        if steps >= MIN_STEPS or (name, precision, checkpointing) == candidates[-1]:
            reason = (f"{where}: {name} takes {per_step:.2f} s per optimizer step here ({_timed_on(data)}), "
                      f"so {steps:,} steps fill "
                      f"{hours:g} h ({PLAN_MARGIN:.0%} of it; the rest for evaluations and backups)")
            if len(tried) > 1:
                reason += f"; larger presets would train fewer than {MIN_STEPS:,} steps ({', '.join(tried[:-1])})"
            if env.gpu_memory_bytes is None:
                reason += ". A GPU runtime (Runtime > Change runtime type) trains ~100x faster"
            return Plan(name, precision, checkpointing, max(steps, 1), per_step, reason)
    raise AssertionError("unreachable: the last candidate always returns")


def _timed_on(data: str | None) -> str:
    return f"timed on {data} batches" if data else "timed on random tokens at the longest length"


def _plan_warm_start(env: Environment, base_model: str, hours: float, budget: float, smoke_steps: int,
                     data: str | None) -> Plan:
    precision = "no" if env.smoke or env.gpu_memory_bytes is None else ("bf16" if env.bf16_supported else "fp16")
    per_step = seconds_per_step(None, precision, False, base_model=base_model, data=data, timed=1 if env.smoke else 2)
    if env.smoke:
        return Plan("custom", precision, False, smoke_steps, per_step,
                    f"CI smoke mode: warm start from {base_model}, {smoke_steps} steps ({per_step:.2f} s per step "
                    f"measured here)", base_model=base_model)
    fit = int(budget / per_step)
    steps = max(1, min(fit, WARM_START_MAX_STEPS))
    where = f"{env.gpu_name}, {precision}" if env.gpu_name else "no GPU on this runtime"
    reason = (f"{where}: a warm start from {base_model} takes {per_step:.2f} s per optimizer step here "
              f"({_timed_on(data)}), so "
              f"{fit:,} steps fill {hours:g} h ({PLAN_MARGIN:.0%} of it)")
    if fit > WARM_START_MAX_STEPS:
        reason += (f"; planned {WARM_START_MAX_STEPS:,} (about {WARM_START_MAX_STEPS * per_step / 3600 / PLAN_MARGIN:.1f} h): "
                   f"a pretrained encoder learns little more after that")
    if env.gpu_memory_bytes is None:
        reason += ". A GPU runtime (Runtime > Change runtime type) trains ~100x faster"
    return Plan("custom", precision, False, steps, per_step, reason, base_model=base_model)


def mount_drive() -> tuple[Path | None, str]:
    """MyDrive, and a sentence saying where it came from: `$NSA_FAKE_DRIVE` if set (a local folder that
    stands for Drive in tests and CI), else Google Drive mounted in Colab, else None (no Drive: runs live
    in a local folder). A failed mount returns None with the reason; it does not raise."""
    fake = os.environ.get("NSA_FAKE_DRIVE")
    if fake:
        folder = Path(fake).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        return folder, f"NSA_FAKE_DRIVE: {folder} stands for MyDrive"
    if "google.colab" not in sys.modules:
        return None, "not in Colab and no NSA_FAKE_DRIVE: runs live in the local folder runs/"
    try:
        if not (DRIVE_ROOT / "MyDrive").is_dir():
            from google.colab import drive

            drive.mount(str(DRIVE_ROOT))
        return DRIVE_ROOT / "MyDrive", "Google Drive mounted at /content/drive/MyDrive"
    except Exception as e:  # a refused or failed mount: keep working, say what it means
        return None, (f"Google Drive could not be mounted ({type(e).__name__}: {e}); the run lives on this "
                      f"runtime's disk, which is lost when it resets")


@dataclass
class RunPaths:
    """Where one run's files go. `folder` is shared (Drive): run_config.json, metrics.jsonl, config.json,
    backups/, best/, final/, dashboard.png. `work` is this runtime's local disk: working checkpoints."""

    name: str
    folder: Path
    work: Path
    on_drive: bool

    @classmethod
    def for_run(cls, name: str, drive: Path | None) -> "RunPaths":
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"RUN_NAME {name!r}: give a plain folder name such as 'run1'")
        if drive is None:
            folder = Path("runs") / name
            return cls(name, folder, folder / "checkpoints", False)
        local = Path("/content/nsa-work") if "google.colab" in sys.modules else Path("work")
        return cls(name, drive / PROJECT_FOLDER / name, local / name / "checkpoints", True)

    @property
    def backups(self) -> Path:
        return self.folder / "backups"

    @property
    def config_file(self) -> Path:
        return self.folder / RUN_CONFIG_FILE


def save_run_config(run: RunPaths, settings: dict) -> Path:
    """Write the run's settings (preset, precision, data, the plan and the machine it was made on) into
    its folder, atomically."""
    path = run.config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def read_run_config(run: RunPaths) -> dict:
    """The settings 01_setup wrote for this run, from its folder (on Drive: any runtime finds them)."""
    if not run.config_file.is_file():
        where = "on Drive" if run.on_drive else "on this machine"
        raise FileNotFoundError(f"no run named {run.name!r} {where} (no {run.config_file}): run 01_setup with "
                                f"RUN_NAME = {run.name!r} first, or set RUN_NAME to an existing run")
    return json.loads(run.config_file.read_text())


def settings_for_base_model(run: RunPaths, settings: dict, env: Environment, base_model: str | None) -> tuple[dict, list[str]]:
    """The run's settings for the base model that 02_train asks for (`base_model_name(BASE_MODEL)`), and
    what was done about it in sentences: nothing when 01_setup planned the same one; a run that has
    started keeps its own (weights come from its checkpoints); a run not yet started is re-planned for
    the new choice (the steps timed here, for the hours 01_setup was given) and its settings saved."""
    from .runfolder import previous_run

    planned = settings.get("base_model")
    if base_model == planned:
        return settings, []
    said = lambda name: name or "none (from scratch)"  # noqa: E731
    started = previous_run(run.folder, run.work) or any(run.backups.glob("ckpt-*"))
    if started:
        return settings, [f"BASE_MODEL {said(base_model)}: this run started from {said(planned)} and keeps it; a "
                          f"new RUN_NAME starts from {said(base_model)}"]
    plan = plan_run(env, float(settings.get("hours", 1)), base_model=base_model, data=settings.get("data"))
    updated = {**settings, "preset": plan.preset, "base_model": plan.base_model, "precision": plan.precision,
               "gradient_checkpointing": plan.gradient_checkpointing, "max_steps": plan.max_steps, "plan": plan.reason}
    save_run_config(run, updated)
    return updated, [f"BASE_MODEL {said(base_model)}: 01_setup planned {said(planned)}; re-planned: {plan.reason}"]


def differences_from_setup(run_config: dict, env: Environment) -> list[str]:
    """What differs between the machine the run was planned on and this one, in sentences (empty if
    nothing that matters). The run keeps its preset and precision; this says what that means here."""
    planned = run_config.get("environment", {})
    notes = []
    if planned.get("gpu_name") != env.gpu_name:
        notes.append(f"this runtime has {env.gpu_name or 'no GPU'}, the run was planned on "
                     f"{planned.get('gpu_name') or 'no GPU'}: it keeps its preset {run_config.get('preset')} "
                     f"and precision {run_config.get('precision')}; steps will take a different time")
    if run_config.get("precision") == "bf16" and env.gpu_name and not env.bf16_supported:
        notes.append(f"{env.gpu_name} has no bf16: this run (planned in bf16) will be slow here; "
                     f"a T4 wants fp16, which a new run would choose")
    if env.gpu_memory_bytes and planned.get("gpu_memory_bytes") and env.gpu_memory_bytes < planned["gpu_memory_bytes"]:
        notes.append(f"this GPU has less memory ({env.gpu_memory_bytes / 2**30:.0f} GiB, planned on "
                     f"{planned['gpu_memory_bytes'] / 2**30:.0f} GiB): the run may not fit; gradient "
                     f"checkpointing ({run_config.get('gradient_checkpointing')}) may be turned on when resuming")
    return notes


def environment_dict(env: Environment) -> dict:
    return asdict(env)
