"""The GPU check: what only a GPU can tell about nsa_lib, in one short run (under 8 minutes on one GPU).

    python bench/gpu_check.py --json $OUT/gpu_check.json        # one CUDA GPU: M456 / mini shapes
    python bench/gpu_check.py --device cpu --quick --json x.json  # every code path on a CPU, tiny shapes

Four sections, each guarded (a failure is reported and the others still run), each printed as a table
and written to `--json` as soon as it finishes (so a run cut short keeps what it measured):

    accuracy    SpectralEntropyAttention on the device (the generic `fractal_augment` + SDPA path) against
                the literal O(S³) formula `tests.reference.literal_attention` in float64 on the same device,
                in fp32, bf16 autocast and fp16 autocast, fractal depth 1 and 2, on a right-padded batch:
                the largest |error| of the output and of dL/dx over real tokens. A plain attention block
                (use_spectral=False) gives the error that the precision alone costs.
    speed       forward+backward of one M456 attention block (hidden 1024, 16 heads, spectral_dim 192) against
                the same module with use_spectral=False, batch 8, S = 128, 512, 1024, bf16 autocast, padded
                batch; medians of timings taken in turns, with CUDA synchronisation.
    memory      torch.cuda.max_memory_allocated of one M456 training step (NSAModel + NSALoss, fused AdamW
                with its states already allocated, batch 8 triplets = 24 sequences of 160 random tokens,
                bf16 autocast), with and without gradient checkpointing, next to
                `estimate_training_memory(...)["total"]`.
    throughput  optimizer steps per second of M456 and mini as the trainer takes them (batch_train triplets
                per micro-batch, grad_accum micro-batches, clipping, AdamW), bf16 autocast, on batches of
                random token ids of the preset's max_length (no padding): speed only, not learning.

`--quick` swaps in tiny shapes (the `tiny` preset for the model sections, S = 32/64, few repeats). On a CPU
(`--device cpu`, which needs `--quick`) the dispatch to the CPU's hand-fused kernel is switched off so that
the GPU's code path is the one exercised, and the memory section reports "n/a on CPU" next to the estimate.
Exit codes: 0 every section passed, 1 a section failed, 2 no CUDA device (or a full run asked of a CPU).
"""
import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa_lib import attention  # noqa: E402
from nsa_lib import NSAConfig, NSALoss, NSAModel, SpectralEntropyAttention, estimate_training_memory  # noqa: E402
from nsa_lib.config import format_bytes  # noqa: E402
from tests.reference import literal_attention  # noqa: E402

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Plan:
    """The shapes and repeat counts of one run."""

    block_preset: str  # attention block shape for accuracy and speed
    accuracy_batch: int
    accuracy_seq: int
    speed_batch: int
    speed_seqs: tuple[int, ...]
    speed_warmup: int
    speed_repeats: int
    memory_preset: str
    memory_batch: int  # triplets
    memory_seq: int
    throughput_presets: tuple[str, ...]
    throughput_warmup: int
    throughput_steps: int
    budget_s: float


FULL = Plan(block_preset="M456", accuracy_batch=4, accuracy_seq=128, speed_batch=8, speed_seqs=(128, 512, 1024),
            speed_warmup=3, speed_repeats=20, memory_preset="M456", memory_batch=8, memory_seq=160,
            throughput_presets=("M456", "mini"), throughput_warmup=3, throughput_steps=20, budget_s=420)
QUICK = Plan(block_preset="tiny", accuracy_batch=3, accuracy_seq=32, speed_batch=2, speed_seqs=(32, 64),
             speed_warmup=1, speed_repeats=3, memory_preset="tiny", memory_batch=4, memory_seq=32,
             throughput_presets=("tiny",), throughput_warmup=1, throughput_steps=3, budget_s=60)


# helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    dtype = AUTOCAST[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def split_triplets(out: dict) -> list[dict]:
    """The model's outputs for [anchors; positives; negatives] as three dicts: `nsa_lib.trainer.split_outputs`,
    not imported so that this check needs only what the model needs (torch, numpy, safetensors)."""
    parts = [{}, {}, {}]
    for key, value in out.items():
        if isinstance(value, dict):  # the Matryoshka heads: {dim: (3B, dim)}
            for dim, t in value.items():
                for part, chunk in zip(parts, t.chunk(3)):
                    part.setdefault(key, {})[dim] = chunk
        else:
            for part, chunk in zip(parts, value.chunk(3)):
                part[key] = chunk
    return parts


def padded_mask(batch: int, seq: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """(batch, seq) right-padding mask: row 0 full, the others a random length in [seq/4, seq]."""
    lengths = torch.randint(max(1, seq // 4), seq + 1, (batch,), generator=generator)
    lengths[0] = seq
    return (torch.arange(seq)[None, :] < lengths[:, None]).long().to(device)


def make_block(plan: Plan, device: torch.device, *, seed: int = 0, **overrides) -> SpectralEntropyAttention:
    torch.manual_seed(seed)
    return SpectralEntropyAttention(NSAConfig.from_preset(plan.block_preset, **overrides)).to(device)


def fmt(value, spec: str = ".2e") -> str:
    return "n/a" if value is None else format(value, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


# sections


def check_accuracy(plan: Plan, device: torch.device) -> dict:
    """Output and input-gradient errors of the device path against the float64 literal formula."""
    g = torch.Generator().manual_seed(1)
    H = NSAConfig.from_preset(plan.block_preset).hidden_size
    B, S = plan.accuracy_batch, plan.accuracy_seq
    x = torch.randn(B, S, H, generator=g).to(device)
    upstream = torch.randn(B, S, H, generator=g).to(device)
    mask = padded_mask(B, S, device, g)
    real = mask.bool()

    def out_and_grad(fn, inputs, precision):
        t = inputs.clone().requires_grad_(True)
        with autocast(device, precision):
            y = fn(t)
        (y.double() * upstream.double() * mask[..., None]).sum().backward()  # dL/dy = upstream on real tokens
        return y.detach().double()[real], t.grad.double()[real]

    rows = []
    for use_spectral, depth in ((True, 1), (True, 2), (False, None)):
        overrides = {"dropout": 0.0, "use_spectral": use_spectral}
        if use_spectral:  # weights off their small defaults, so that the fractal and spectral terms matter
            overrides.update(fractal_depth=depth, fractal_init=0.5)
        att = make_block(plan, device, **overrides).eval()
        with torch.no_grad():
            att.ln.weight.uniform_(0.5, 1.5)
            att.ln.bias.normal_(0.0, 0.1)
            if use_spectral:
                att.spectral_fusion_weight.fill_(0.3)
        att64 = copy.deepcopy(att).double()
        ref_out, ref_grad = out_and_grad(lambda t, ref=att64: literal_attention(ref, t, mask), x.double(), "fp32")
        for precision in AUTOCAST:
            out, grad = out_and_grad(lambda t, block=att: block(t, mask), x, precision)
            rows.append({"block": "spectral" if use_spectral else "plain", "fractal_depth": depth,
                         "precision": precision, "max_abs_error": (out - ref_out).abs().max().item(),
                         "grad_max_abs_error": (grad - ref_grad).abs().max().item(),
                         "grad_max_abs_reference": ref_grad.abs().max().item()})
    print(f"batch {B}, S {S} (right-padded, real lengths {mask.sum(1).tolist()}), {plan.block_preset} block; "
          f"errors over real tokens against float64 literal_attention on {device.type}")
    print(table(["block", "depth", "precision", "max|out - ref|", "max|dx - dx_ref|", "max|dx_ref|"],
                [[r["block"], str(r["fractal_depth"] or "-"), r["precision"], fmt(r["max_abs_error"]),
                  fmt(r["grad_max_abs_error"]), fmt(r["grad_max_abs_reference"])] for r in rows]))
    return {"batch": B, "seq_len": S, "block_preset": plan.block_preset, "rows": rows}


def check_speed(plan: Plan, device: torch.device) -> dict:
    """Forward+backward of our block against a plain SDPA block, bf16 autocast, timed in turns."""
    ours = make_block(plan, device).train()
    plain = make_block(plan, device, use_spectral=False).train()
    H, B = ours.q.in_features, plan.speed_batch
    g = torch.Generator().manual_seed(2)

    def fwd_bwd(block, x, mask) -> float:
        x.grad = None
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, "bf16"):
            y = block(x, mask)
        y.float().sum().backward()
        sync(device)
        return time.perf_counter() - t0

    rows = []
    for S in plan.speed_seqs:
        x = torch.randn(B, S, H, generator=g).to(device).requires_grad_(True)
        mask = padded_mask(B, S, device, g)
        times = {"ours": [], "plain": []}
        for n in range(plan.speed_warmup + plan.speed_repeats):
            for name, block in (("ours", ours), ("plain", plain)):
                t = fwd_bwd(block, x, mask)
                if n >= plan.speed_warmup:
                    times[name].append(t)
        ours_ms, plain_ms = (1e3 * statistics.median(times[k]) for k in ("ours", "plain"))
        rows.append({"seq_len": S, "ours_ms": ours_ms, "plain_ms": plain_ms, "ratio": ours_ms / plain_ms})
    cfg = NSAConfig.from_preset(plan.block_preset)
    print(f"{plan.block_preset} block (hidden {cfg.hidden_size}, {cfg.num_heads} heads, spectral_dim "
          f"{cfg.spectral_dim}), batch {B}, padded, bf16 autocast, train mode; forward+backward, median of "
          f"{plan.speed_repeats} after {plan.speed_warmup} warm-up, timed in turns")
    print(table(["S", "plain ms", "ours ms", "ours/plain"],
                [[str(r["seq_len"]), fmt(r["plain_ms"], ".2f"), fmt(r["ours_ms"], ".2f"), fmt(r["ratio"], ".2f")]
                 for r in rows]))
    return {"batch": B, "block_preset": plan.block_preset, "precision": "bf16", "repeats": plan.speed_repeats,
            "rows": rows}


class TrainingStep:
    """One optimizer step as the trainer takes it: grad_accum micro-batches of forward, NSALoss and backward
    under autocast, clipping to max_grad_norm, fused AdamW."""

    def __init__(self, config: NSAConfig, device: torch.device, precision: str = "bf16"):
        self.config, self.device, self.precision = config, device, precision
        with torch.device(device):  # initialised on the device: M456 in seconds
            self.model = NSAModel(config).train()
        self.loss_fn = NSALoss(config, gather=False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay, fused=True)

    def random_batch(self, triplets: int, seq_len: int, generator: torch.Generator) -> dict:
        """3·triplets sequences of random token ids (above the special tokens), no padding."""
        ids = torch.randint(1000, self.config.vocab_size, (3 * triplets, seq_len), generator=generator)
        return {"input_ids": ids.to(self.device), "attention_mask": torch.ones_like(ids).to(self.device)}

    def __call__(self, micro_batches: list[dict]) -> float:
        for batch in micro_batches:
            with autocast(self.device, self.precision):
                loss = self.loss_fn(*split_triplets(self.model(**batch)), temperature=0.07).total
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def check_memory(plan: Plan, device: torch.device) -> dict:
    """Peak memory of one training step (Adam states already allocated) against the estimate."""
    config = NSAConfig.from_preset(plan.memory_preset)
    B, S = plan.memory_batch, plan.memory_seq
    g = torch.Generator().manual_seed(3)
    rows = []
    for ckpt in (False, True):
        estimate = estimate_training_memory(config, batch_size=B, seq_len=S, precision="bf16",
                                            gradient_checkpointing=ckpt)["total"]
        step = TrainingStep(NSAConfig.from_preset(plan.memory_preset, gradient_checkpointing=ckpt), device)
        batch = [step.random_batch(B, S, g)]
        loss = step(batch)  # allocates the Adam states, as in every step after the first
        measured = resident = None
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
            loss = step(batch)
            sync(device)
            measured = torch.cuda.max_memory_allocated(device)
        rows.append({"gradient_checkpointing": ckpt, "measured_bytes": measured, "estimated_bytes": estimate,
                     "measured_over_estimate": None if measured is None else measured / estimate,
                     "resident_bytes": resident, "loss": loss,
                     "note": None if device.type == "cuda" else "n/a on CPU"})
        del step, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{plan.memory_preset}, one training step: batch {B} triplets = {3 * B} sequences of {S} random tokens, "
          f"bf16 autocast, fused AdamW (states allocated by a first step); peak = torch.cuda.max_memory_allocated")
    print(table(["grad ckpt", "measured peak", "estimate", "measured/estimate", "weights+Adam resident"],
                [[str(r["gradient_checkpointing"]),
                  r["note"] or format_bytes(r["measured_bytes"]), format_bytes(r["estimated_bytes"]),
                  fmt(r["measured_over_estimate"], ".2f"),
                  "n/a" if r["resident_bytes"] is None else format_bytes(r["resident_bytes"])] for r in rows]))
    return {"preset": plan.memory_preset, "batch_triplets": B, "seq_len": S, "precision": "bf16", "rows": rows}


def check_throughput(plan: Plan, device: torch.device) -> dict:
    """Optimizer steps per second on random token batches of each preset's max_length."""
    g = torch.Generator().manual_seed(4)
    rows = []
    for preset in plan.throughput_presets:
        config = NSAConfig.from_preset(preset)
        step = TrainingStep(config, device)
        micro_batches = [step.random_batch(config.batch_train, config.max_length, g) for _ in range(config.grad_accum)]
        for _ in range(plan.throughput_warmup):
            step(micro_batches)
        times = []
        for _ in range(plan.throughput_steps):
            sync(device)
            t0 = time.perf_counter()
            loss = step(micro_batches)
            sync(device)
            times.append(time.perf_counter() - t0)
        total = sum(times)
        triplets = config.batch_train * config.grad_accum
        rows.append({"preset": preset, "batch_train": config.batch_train, "grad_accum": config.grad_accum,
                     "seq_len": config.max_length, "steps": plan.throughput_steps,
                     "steps_per_s": plan.throughput_steps / total, "median_step_s": statistics.median(times),
                     "triplets_per_s": plan.throughput_steps * triplets / total,
                     "tokens_per_s": plan.throughput_steps * 3 * triplets * config.max_length / total,
                     "loss": loss})
        del step, micro_batches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"optimizer steps as the trainer takes them (batch_train x grad_accum triplets, clipping, fused AdamW), "
          f"bf16 autocast, RANDOM token ids at the preset's max_length (no padding); "
          f"{plan.throughput_steps} timed steps after {plan.throughput_warmup} warm-up")
    print(table(["preset", "triplets/step", "seq", "steps/s", "median step s", "triplets/s", "tokens/s"],
                [[r["preset"], f"{r['batch_train']}x{r['grad_accum']}", str(r["seq_len"]), fmt(r["steps_per_s"], ".3f"),
                  fmt(r["median_step_s"], ".3f"), fmt(r["triplets_per_s"], ".1f"), fmt(r["tokens_per_s"], ".0f")]
                 for r in rows]))
    return {"precision": "bf16", "random_tokens": True, "rows": rows}


SECTIONS = {"accuracy": check_accuracy, "speed": check_speed, "memory": check_memory, "throughput": check_throughput}


# the run


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   sdpa_flash=torch.backends.cuda.flash_sdp_enabled(),
                   sdpa_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                   sdpa_cudnn=torch.backends.cuda.cudnn_sdp_enabled())
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (the only mode on a CPU)")
    ap.add_argument("--json", type=Path, help="write the results here (after every section)")
    ap.add_argument("--budget-s", type=float, help="skip the sections that would start after this many seconds "
                                                   "(default 420, or 60 with --quick)")
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device is visible to torch {torch.__version__}; this check needs one GPU. "
              f"To exercise its code paths on a CPU: python bench/gpu_check.py --device cpu --quick", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.quick:
        print("gpu_check: the full-size check needs a GPU; on a CPU only --quick runs "
              "(python bench/gpu_check.py --device cpu --quick)", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    budget = args.budget_s if args.budget_s is not None else plan.budget_s
    device = torch.device(args.device)
    if device.type == "cpu":  # take the GPU's path (fractal_augment + SDPA), not the CPU's hand-fused kernel
        attention.CPU_FUSED_MAX_SCORES = 0
        attention.MATERIALIZED_SCORES_MAX_LEN = 0

    started = time.perf_counter()
    report = {"environment": environment(device), "quick": args.quick, "plan": asdict(plan), "budget_s": budget,
              "sections": {}}
    print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()))
    print(f"time budget {budget:.0f} s ({'quick' if args.quick else 'full'} run)")
    for name in args.sections:
        elapsed = time.perf_counter() - started
        print(f"\n== {name} ({elapsed:.1f} s elapsed)")
        if elapsed > budget:
            report["sections"][name] = {"ok": False, "skipped": f"over the time budget ({elapsed:.0f} s > {budget:.0f} s)"}
            print(f"skipped: {report['sections'][name]['skipped']}")
        else:
            t0 = time.perf_counter()
            try:
                result = {"ok": True, **SECTIONS[name](plan, device)}
            except Exception as e:  # report it and go on with the next section
                traceback.print_exc()
                result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                print(f"FAILED: {result['error']}")
            result["seconds"] = time.perf_counter() - t0
            report["sections"][name] = result
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["elapsed_s"] = time.perf_counter() - started
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    failed = [n for n, r in report["sections"].items() if not r["ok"]]
    print("\n== summary")
    print(table(["section", "result", "seconds"],
                [[n, "ok" if r["ok"] else ("skipped" if "skipped" in r else "FAILED"), fmt(r.get("seconds"), ".1f")]
                 for n, r in report["sections"].items()]))
    print(f"total {report['elapsed_s']:.1f} s of the {budget:.0f} s budget"
          + (f"; results in {args.json}" if args.json else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
