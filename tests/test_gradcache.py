"""GradCache (nsa_lib.gradcache) against the uncached step, in float64 on real SNLI batches.

With dropout off, a cached step's loss and gradients equal one forward over the whole batch; with dropout
on, they equal the uncached step that runs the same chunks with a graph (the same rows and the same RNG
draws, replayed). Also through the trainer: the same losses with and without `mini_batch_size`.
"""
import pytest
import torch

from nsa_lib import NSAConfig, NSALoss, NSAModel
from nsa_lib.data import TokenizedTriplets, TripletBatches, load_snli_triplets, load_tokenizer
from nsa_lib.gradcache import cached_step
from nsa_lib.trainer import Trainer, split_outputs


@pytest.fixture(scope="module")
def data():
    return load_tokenizer(source="offline"), load_snli_triplets("train")[:400]


@pytest.fixture(scope="module")
def batch(data):
    tokenizer, triplets = data
    batcher = TripletBatches(TokenizedTriplets.build(triplets[:64], tokenizer, 32), 12, seed=0)
    return batcher.collate(batcher.batches(0)[0])  # 36 sequences, padded


def model_and_loss(dropout):
    config = NSAConfig.from_preset("tiny", dropout=dropout, fractal_init=0.3)
    torch.manual_seed(0)
    return NSAModel(config).double().train(), NSALoss(config, gather=False)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def uncached(model, loss_fn, batch, chunk=None):
    """The plain step: one forward (or the same chunks, with a graph), the loss, one backward."""
    model.zero_grad(set_to_none=True)
    if chunk is None:
        out = model(**batch)
    else:
        parts = [model(**{k: v[s:s + chunk] for k, v in batch.items()}) for s in range(0, 36, chunk)]
        out = {k: ({d: torch.cat([p[k][d] for p in parts]) for d in v} if isinstance(v, dict) else
                   torch.cat([p[k] for p in parts])) for k, v in parts[0].items() if k != "last_hidden_state"}
    loss = loss_fn(*split_outputs(out, 3), temperature=0.05)
    loss.total.backward()
    return loss.total.item(), grads(model)


def cached(model, loss_fn, batch, chunk):
    model.zero_grad(set_to_none=True)
    loss, _, done = cached_step(model, batch, lambda out: loss_fn(*split_outputs(out, 3), temperature=0.05), chunk)
    assert done
    return loss.total.item(), grads(model)


def assert_same(a, b, tol=1e-8):
    assert abs(a[0] - b[0]) <= tol
    assert a[1].keys() == b[1].keys() and len(a[1]) > 50
    worst = max((a[1][n] - b[1][n]).abs().max().item() for n in a[1])
    assert worst <= tol, worst


@pytest.mark.parametrize("chunk", [5, 12, 36])
def test_cached_equals_one_forward_over_the_whole_batch(batch, chunk):
    model, loss_fn = model_and_loss(dropout=0.0)
    assert_same(cached(model, loss_fn, batch, chunk), uncached(model, loss_fn, batch))


def test_with_dropout_the_masks_are_replayed(batch):
    model, loss_fn = model_and_loss(dropout=0.1)
    torch.manual_seed(123)
    reference = uncached(model, loss_fn, batch, chunk=7)
    after_reference = torch.get_rng_state()
    torch.manual_seed(123)
    result = cached(model, loss_fn, batch, 7)
    assert_same(result, reference)
    assert torch.equal(torch.get_rng_state(), after_reference)  # the RNG streams end where they would have
    torch.manual_seed(124)
    assert abs(cached(model, loss_fn, batch, 7)[0] - reference[0]) > 1e-6  # dropout does act


def test_trainer_with_mini_batches_repeats_the_plain_losses(tmp_path, data):
    tokenizer, triplets = data
    settings = dict(batch_train=8, grad_accum=2, max_steps=4, save_every=0, eval_every=0, max_length=32, dropout=0.0)
    losses = {}
    for name, extra in (("plain", {}), ("cached", {"mini_batch_size": 5})):
        trainer = Trainer(NSAConfig.from_preset("tiny", **settings, **extra), output_dir=tmp_path / name,
                          tokenizer=tokenizer, triplets=triplets, show_progress=False)
        records = []
        trainer.callbacks.append(records.append)
        trainer.train()
        losses[name] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["plain"]) == 4
    assert max(abs(a - b) for a, b in zip(losses["plain"], losses["cached"])) <= 1e-4
