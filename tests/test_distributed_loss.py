"""InfoNCE candidates gathered across processes (SPEC 5: in-batch negatives from every GPU).

Two CPU processes over gloo, each holding half of a global batch, must give the loss of one process over
the whole batch: the mean of the two per-process losses equals it, and each process's gradients on its own
rows equal world_size x the single-process gradients (autograd's all_gather sums every process's
candidate gradients into the rows' owner; DistributedDataParallel then averages over processes).
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nsa_lib import NSAConfig
from nsa_lib.losses import NSALoss, gather_candidates

WORLD, PER_PROCESS = 2, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs(config: NSAConfig, rows: slice) -> list[dict]:
    """Anchor/positive/negative dicts with every key NSALoss reads (float64 leaves), for `rows` of one
    fixed global batch."""
    g = torch.Generator().manual_seed(0)
    n = WORLD * PER_PROCESS

    def unit(dim):
        t = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
        return t[rows].clone().requires_grad_()

    return [{"embedding_semantic": {d: unit(d) for d in config.sem_dims},
             "entity": {d: unit(d) for d in config.ent_dims},
             "retrieval128": unit(config.retrieval_dim), "anchor64": unit(config.anchor_dim),
             "embedding_ranking": unit(config.ranking_dim), "spectral": unit(config.spectral_dim),
             "pooled": torch.zeros(n, 1, dtype=torch.float64)[rows]} for _ in range(3)]


def gradients(outs: list[dict]) -> dict[str, torch.Tensor]:
    grads = {}
    for side, out in zip("apn", outs):
        for key, value in out.items():
            for sub, t in (value.items() if isinstance(value, dict) else [(None, value)]):
                if t.requires_grad and t.grad is not None:  # e.g. the larger entity dims feed no term
                    grads[f"{side}.{key}.{sub}"] = t.grad.tolist()
    return grads


def worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        config = NSAConfig.from_preset("tiny")
        outs = outputs(config, slice(rank * PER_PROCESS, (rank + 1) * PER_PROCESS))
        loss = NSALoss(config)(*outs, temperature=0.05)
        loss.total.backward()
        with torch.no_grad():  # e.g. an evaluation: gathered without a graph, and no complaint about it
            gathered, offset = gather_candidates(outs[0]["retrieval128"])
        assert gathered.shape == (WORLD * PER_PROCESS, config.retrieval_dim) and offset == rank * PER_PROCESS
        queue.put((rank, loss.total.item(), gradients(outs)))
        dist.barrier()  # tear down together: gloo aborts a process whose peer has already closed the pair
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_loss_equals_single_process_loss_on_the_global_batch():
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, queue)) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    results = {rank: (loss, grads) for rank, loss, grads in (queue.get(timeout=60) for _ in range(WORLD))}
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0

    config = NSAConfig.from_preset("tiny")
    whole = outputs(config, slice(None))
    single = NSALoss(config, gather=False)(*whole, temperature=0.05)
    single.total.backward()
    assert sum(loss for loss, _ in results.values()) / WORLD == pytest.approx(single.total.item(), abs=1e-12)
    expected = gradients(whole)
    assert expected.keys() == results[0][1].keys() and len(expected) > 20
    for name, grad in expected.items():
        gathered = torch.cat([torch.tensor(results[rank][1][name], dtype=torch.float64) for rank in range(WORLD)])
        assert torch.allclose(gathered, WORLD * torch.tensor(grad, dtype=torch.float64), atol=1e-12), name
    # the gathering matters: without it each process would see only its own rows as negatives
    local = NSALoss(config, gather=False)(*outputs(config, slice(0, PER_PROCESS)), temperature=0.05)
    assert abs(local.total.item() - results[0][0]) > 1e-3
