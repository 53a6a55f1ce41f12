"""What the notebooks decide from the machine: the preset for a GPU's memory, the plan for the hours
given, where a run lives (Drive, the NSA_FAKE_DRIVE stand-in, or a local folder), and the run
configuration they pass on through it."""
from pathlib import Path

import pytest

from nsa_lib.config import NSAConfig, estimate_training_memory
from nsa_lib.environment import (Environment, RunPaths, choose_preset, detect_environment, differences_from_setup,
                                 environment_dict, mount_drive, plan_run, read_run_config, save_run_config)

GiB = 2 ** 30


def gpu(memory_gib, bf16=True, smoke=False):
    return Environment(in_colab=True, smoke=smoke, gpu_name="GPU", gpu_memory_bytes=int(memory_gib * GiB),
                       bf16_supported=bf16, cpu_count=8)


ORDER = ["mini", "M456", "M600", "M700", "M1B"]


@pytest.mark.parametrize("memory,bf16", [(80, True), (40, True), (16, False), (8, False)])
def test_the_largest_preset_that_fits(memory, bf16):
    preset, precision, checkpointing = choose_preset(gpu(memory, bf16))
    assert precision == ("bf16" if bf16 else "fp16")

    def need(name, ckpt):
        return estimate_training_memory(NSAConfig.from_preset(name), precision=precision,
                                        gradient_checkpointing=ckpt)["total"]

    assert need(preset, checkpointing) <= 0.85 * memory * GiB
    bigger = ORDER[ORDER.index(preset) + 1:]
    assert all(need(name, True) > 0.85 * memory * GiB for name in bigger)  # none larger fits, even checkpointed


def test_an_80_gib_gpu_takes_the_largest_preset():
    assert choose_preset(gpu(80))[0] == "M1B"


def test_smoke_and_cpu_choices():
    assert choose_preset(gpu(80, smoke=True)) == ("tiny", "no", False)
    cpu = Environment(in_colab=False, smoke=False, gpu_name=None, gpu_memory_bytes=None, bf16_supported=False,
                      cpu_count=2)
    assert choose_preset(cpu) == ("mini", "no", False)
    assert "no GPU" in cpu.describe()


def test_without_drive_a_run_lives_in_a_local_folder(monkeypatch):
    monkeypatch.delenv("NSA_FAKE_DRIVE", raising=False)
    drive, note = mount_drive()
    assert drive is None and "not in Colab" in note
    run = RunPaths.for_run("run1", drive)
    assert (run.folder, run.work, run.on_drive) == (Path("runs/run1"), Path("runs/run1/checkpoints"), False)


def test_fake_drive_stands_for_mydrive(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_FAKE_DRIVE", str(tmp_path / "drive"))
    drive, note = mount_drive()
    assert drive == tmp_path / "drive" and drive.is_dir() and "NSA_FAKE_DRIVE" in note
    run = RunPaths.for_run("run1", drive)
    assert run.folder == tmp_path / "drive" / "spectra-nsa" / "run1" and run.on_drive
    assert run.backups == run.folder / "backups" and not str(run.work).startswith(str(tmp_path / "drive"))


@pytest.mark.parametrize("name", ["", "a/b", ".hidden"])
def test_bad_run_names(name):
    with pytest.raises(ValueError, match="RUN_NAME"):
        RunPaths.for_run(name, None)


def test_run_config_round_trip_and_missing(tmp_path):
    run = RunPaths.for_run("run1", tmp_path)
    with pytest.raises(FileNotFoundError, match="no run named 'run1' on Drive.*01_setup with RUN_NAME = 'run1'"):
        read_run_config(run)
    path = save_run_config(run, {"preset": "tiny", "max_steps": 6})
    assert path == tmp_path / "spectra-nsa" / "run1" / "run_config.json"
    assert read_run_config(RunPaths.for_run("run1", tmp_path)) == {"preset": "tiny", "max_steps": 6}


def test_plan_in_smoke_mode_times_tiny_steps():
    plan = plan_run(gpu(16, smoke=True), hours=3, smoke_steps=4)
    assert (plan.preset, plan.max_steps) == ("tiny", 4) and plan.seconds_per_step > 0
    assert "smoke" in plan.reason


def test_plan_on_a_cpu_fills_the_hours_and_says_what_a_cpu_means():
    cpu = Environment(in_colab=False, smoke=False, gpu_name=None, gpu_memory_bytes=None, bf16_supported=False,
                      cpu_count=2)
    plan = plan_run(cpu, hours=0.02, preset="tiny")  # 72 s: a timed tiny step is well under a second here
    assert plan.preset == "tiny" and plan.precision == "no"
    assert plan.max_steps == int(0.02 * 3600 * 0.85 / plan.seconds_per_step)
    assert "no GPU" in plan.reason and "GPU runtime" in plan.reason
    with pytest.raises(ValueError, match="HOURS"):
        plan_run(cpu, hours=0)


def test_differences_from_the_planned_machine_are_said():
    planned = {"preset": "M456", "precision": "bf16", "gradient_checkpointing": False,
               "environment": environment_dict(gpu(40))}
    assert differences_from_setup(planned, gpu(40)) == []
    notes = differences_from_setup(planned, Environment(in_colab=True, smoke=False, gpu_name="Tesla T4",
                                                        gpu_memory_bytes=15 * GiB, bf16_supported=False, cpu_count=2))
    assert any("keeps its preset M456" in n for n in notes) and any("no bf16" in n for n in notes)
    assert any("less memory" in n for n in notes)


def test_this_machine():
    env = detect_environment()
    assert env.cpu_count >= 1 and (env.gpu_name is None) == (env.gpu_memory_bytes is None)
