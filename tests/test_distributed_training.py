"""The trainer under several processes (2 CPU processes over gloo, as torchrun / accelerate launch start
them), with every ablation flag, and with a non-finite loss on one process only.

DistributedDataParallel stops on a trainable parameter that gets no gradient (e.g. the entity head under
--no-bridge) and waits forever for a process that skipped its backward pass (a non-finite loss on that
process alone). Each worker reports through a queue; a hang shows up as a timeout, not a stuck test run.
"""
import os
import queue as queue_module
import socket

import pytest
import torch

from nsa_lib import NSAConfig

WORLD = 2
FLAG_SETS = {  # the command line's ablation flags (cli.TOGGLES), one at a time, and combinations
    "--no-spectral": dict(use_spectral=False),
    "--no-anchor64": dict(use_anchor64=False),
    "--no-bridge": dict(use_bridge=False),
    "--no-matry": dict(use_matryoshka=False),
    "--no-angular": dict(use_angular=False),
    "--no-angular, fast path off": dict(use_angular=False, use_fast=False),
    "every flag": dict(use_spectral=False, use_anchor64=False, use_bridge=False, use_matryoshka=False,
                       use_angular=False),
    "rank off, no spectral": dict(use_rank=False, use_spectral=False),
}
NAN_AT_STEP = 2  # (1-based) optimizer step whose first micro-batch is non-finite on rank 1 only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(**overrides) -> NSAConfig:
    return NSAConfig.from_preset("tiny", **{**dict(batch_train=8, grad_accum=2, max_steps=3, save_every=0,
                                                   eval_every=0, max_length=32), **overrides})


def parameter_checksum(trainer) -> float:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return float(sum(p.double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def worker(rank: int, port: int, root: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), HF_HUB_OFFLINE="1")
    from nsa_lib.data import load_snli_triplets, load_tokenizer
    from nsa_lib.trainer import Trainer

    tokenizer, triplets = load_tokenizer(source="offline"), load_snli_triplets("train")[:400]
    try:
        for i, (name, flags) in enumerate(FLAG_SETS.items()):
            try:
                trainer = Trainer(config(**flags), output_dir=f"{root}/flags-{i}", tokenizer=tokenizer,
                                  triplets=triplets, show_progress=False)
                state = trainer.train()
                results.put((rank, name, "ok", state.step, parameter_checksum(trainer)))
            except Exception as e:  # reported, so that the test names the flag
                results.put((rank, name, f"{type(e).__name__}: {e}"[:500], None, None))
                return

        trainer = Trainer(config(max_steps=4), output_dir=f"{root}/nan", tokenizer=tokenizer,
                          triplets=triplets, show_progress=False)
        if rank == 1:
            calls = {"n": 0}

            def poison(module, inputs, output):  # fault injection through torch's hook API
                calls["n"] += 1
                if calls["n"] == (NAN_AT_STEP - 1) * trainer.config.grad_accum + 1:
                    output = {**output, "spectral": output["spectral"] * float("nan")}
                return output

            trainer.accelerator.unwrap_model(trainer.model).rank_head.register_forward_hook(poison)
        records = []
        trainer.callbacks.append(records.append)
        state = trainer.train()
        skipped_steps = [r["step"] for r in records if r.get("skipped")]
        results.put((rank, "nan", "ok", (state.step, state.skipped, skipped_steps), parameter_checksum(trainer)))
    finally:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results, root = ctx.Queue(), tmp_path_factory.mktemp("ddp")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, str(root), results)) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    got: dict = {}
    try:
        while len(got) < WORLD * (len(FLAG_SETS) + 1):
            rank, name, status, value, checksum = results.get(timeout=180)
            got[(rank, name)] = (status, value, checksum)
            if status != "ok":
                break
    except queue_module.Empty:
        pass  # a hang: the missing reports fail the tests below
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return got


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FLAG_SETS))
def test_every_flag_trains_under_two_processes(reports, name):
    status = [reports.get((rank, name), ("no report (hung or crashed before)", None, None)) for rank in range(WORLD)]
    assert [s for s, _, _ in status] == ["ok"] * WORLD, status
    assert [v for _, v, _ in status] == [3] * WORLD
    assert status[0][2] == pytest.approx(status[1][2], rel=0, abs=1e-9)  # the processes hold the same model


@pytest.mark.slow
def test_non_finite_loss_on_one_process_skips_the_step_on_every_process(reports):
    status = [reports.get((rank, "nan"), ("no report (hung)", None, None)) for rank in range(WORLD)]
    assert [s for s, _, _ in status] == ["ok"] * WORLD, status
    step, skipped, _ = status[1][1]
    assert (step, skipped) == (4, 1) and status[0][1][:2] == (4, 1)
    assert status[0][1][2] == [NAN_AT_STEP]  # the main process logged the step that rank 1 poisoned
    assert status[0][2] == pytest.approx(status[1][2], rel=0, abs=1e-9)
