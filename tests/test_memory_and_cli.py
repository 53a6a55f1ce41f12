"""The memory estimate against what autograd really saves, and the `params` command line."""
import json
import subprocess
import sys

import pytest
import torch

import nsa_lib.attention as attention
from nsa_lib import NSAConfig, NSAModel, estimate_training_memory
from nsa_lib.cli import main


def saved_activation_bytes(config: NSAConfig, sequences: int, seq_len: int) -> int:
    """Bytes of the distinct tensors autograd saves during one training forward (parameters excluded)."""
    torch.manual_seed(0)
    model = NSAModel(config).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (sequences, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(storages.values())


@pytest.mark.parametrize("preset,seq_len,overrides", [
    ("tiny", 64, {}), ("mini", 64, {}), ("mini", 128, {}), ("mini", 64, {"use_spectral": False}),
    ("mini", 64, {"fractal_depth": 2})])
def test_activation_estimate_matches_saved_tensors(monkeypatch, preset, seq_len, overrides):
    # GPUs run the fused kernel path, which the estimate models; force it on the CPU too
    monkeypatch.setattr(attention, "CPU_FUSED_MAX_SCORES", 0)
    monkeypatch.setattr(attention, "MATERIALIZED_SCORES_MAX_LEN", 0)
    config = NSAConfig.from_preset(preset, **overrides)
    batch = 2  # triplets: 6 sequences
    measured = saved_activation_bytes(config, 3 * batch, seq_len)
    estimate = estimate_training_memory(config, batch_size=batch, seq_len=seq_len)["activations"]
    assert abs(estimate / measured - 1) < 0.10, (estimate, measured)


def test_checkpointed_estimate_is_inputs_plus_one_block(monkeypatch):
    monkeypatch.setattr(attention, "CPU_FUSED_MAX_SCORES", 0)
    monkeypatch.setattr(attention, "MATERIALIZED_SCORES_MAX_LEN", 0)
    config = NSAConfig.from_preset("mini", gradient_checkpointing=True)
    one_layer = NSAConfig.from_preset("mini", num_layers=1)
    zero_block = saved_activation_bytes(config, 6, 64)  # forward with checkpointing: block inputs only
    block = saved_activation_bytes(one_layer, 6, 64)  # what one block saves when recomputed
    estimate = estimate_training_memory(config, batch_size=2, seq_len=64)["activations"]
    assert zero_block < estimate
    assert abs(estimate / (zero_block + block) - 1) < 0.15, (estimate, zero_block, block)


def test_params_command_prints_exact_count(capsys):
    assert main(["params", "--size", "M456", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "466,406,896 parameters (466.4M)" in text
    assert "matches the estimate" in text
    assert text.count("GiB") >= 6


def test_params_command_json_for_m1b(capsys):
    assert main(["params", "--size", "M1B", "--json", "--verify"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"]["total"] == data["built"] == 2388144384
    assert {(r["precision"], r["gradient_checkpointing"]) for r in data["memory"]} == {
        (p, c) for p in ("no", "fp16", "bf16") for c in (False, True)}


def test_params_command_unknown_preset_is_a_clear_error(capsys):
    assert main(["params", "--size", "M9"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'M9'" in err and "Traceback" not in err


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "nsa_lib", "params", "--size", "tiny"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Spectra-NSA tiny: 2,192,052 parameters" in done.stdout
