"""What the notebooks decide from the machine: the preset for a GPU's memory, the plan for the hours
given, where a run lives (Drive, the NSA_FAKE_DRIVE stand-in, or a local folder), and the run
configuration they pass on through it."""
from pathlib import Path

import pytest

from nsa_lib.config import NSAConfig, estimate_training_memory
from nsa_lib.data import load_snli_triplets
from nsa_lib.environment import (WARM_START_MAX_STEPS, Environment, RunPaths, base_model_name, choose_preset,
                                 detect_environment, differences_from_setup, environment_dict, mount_drive, plan_run,
                                 read_run_config, run_batches, save_run_config, seconds_per_step,
                                 settings_for_base_model, training_config)
from nsa_lib.warmstart import encoder_tokenizer

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


CPU = Environment(in_colab=False, smoke=False, gpu_name=None, gpu_memory_bytes=None, bf16_supported=False, cpu_count=2)


def test_a_warm_start_is_planned_by_timing_the_encoders_own_steps():
    plan = plan_run(CPU, hours=0.02, base_model="all-MiniLM-L6-v2", data="snli")
    assert (plan.base_model, plan.preset, plan.precision) == ("all-MiniLM-L6-v2", "custom", "no")
    assert plan.max_steps == int(0.02 * 3600 * 0.85 / plan.seconds_per_step)
    assert "warm start from all-MiniLM-L6-v2" in plan.reason and "GPU runtime" in plan.reason
    assert "timed on snli batches" in plan.reason
    long = plan_run(CPU, hours=1000, base_model="all-MiniLM-L6-v2", data="snli")  # more than a warm start needs
    assert long.max_steps == WARM_START_MAX_STEPS and "learns little more" in long.reason
    smoke = plan_run(Environment(**{**environment_dict(CPU), "smoke": True}), hours=3, base_model="all-MiniLM-L6-v2",
                     data="snli", smoke_steps=4)
    assert (smoke.max_steps, smoke.base_model) == (4, "all-MiniLM-L6-v2") and "smoke" in smoke.reason


def test_steps_are_timed_on_the_runs_own_batches_not_the_longest_possible_ones():
    """A step's time follows the data's token lengths (the per-token layers see only real tokens). Timed on
    random tokens at max_length (256), a warm start's SNLI step took ~26 s on 2 cores where training takes
    ~0.7 s: a CPU plan of an hour planned 118 steps where ~4,000 fit."""
    config = training_config({"base_model": "all-MiniLM-L6-v2"})
    batches = run_batches(config, "snli", 3, base_model="all-MiniLM-L6-v2")
    tokenizer = encoder_tokenizer("all-MiniLM-L6-v2")
    snli = {s for t in load_snli_triplets("train") for s in (t.anchor, t.positive, t.negative)}
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == 3 * config.batch_train
        assert mask[:, 0].all() and mask.sum(1).max() == ids.shape[1] < config.max_length // 2
        rows = tokenizer.batch_decode([row[m.bool()] for row, m in zip(ids, mask)], skip_special_tokens=True)
        assert all(r in {s.lower() for s in snli} or r in snli for r in rows[:5])  # real SNLI sentences
    on_data = seconds_per_step(None, "no", False, base_model="all-MiniLM-L6-v2", data="snli", timed=1, warmup=1)
    longest = seconds_per_step(None, "no", False, base_model="all-MiniLM-L6-v2", timed=1, warmup=0)
    assert on_data < longest / 5


@pytest.mark.parametrize("field,expected", [("all-MiniLM-L6-v2", "all-MiniLM-L6-v2"), (" BAAI/bge-small-en-v1.5 ",
                                            "BAAI/bge-small-en-v1.5"), ("none (from scratch)", None), ("None", None),
                                            ("", None)])
def test_the_base_model_field(field, expected):
    assert base_model_name(field) == expected


def test_training_config_is_the_encoders_for_a_warm_start_and_the_presets_otherwise():
    warm = training_config({"preset": "custom", "base_model": "all-MiniLM-L6-v2"}, max_steps=7, use_spectral=False)
    assert (warm.architecture, warm.hidden_size, warm.num_layers, warm.max_steps, warm.use_spectral) == \
        ("bert", 384, 6, 7, False)
    assert warm.backbone_lr == 2e-5  # the warm start's defaults stay unless an option names them
    cold = training_config({"preset": "tiny", "base_model": None}, max_steps=7)
    assert (cold.size, cold.architecture, cold.max_steps) == ("tiny", "nsa", 7)


def test_02_train_asking_for_another_base_model(tmp_path):
    """A run not yet started is re-planned for it (and saved); a started run keeps its own."""
    run = RunPaths.for_run("run1", tmp_path)
    settings = {"run_name": "run1", "base_model": None, "preset": "tiny", "precision": "no",
                "gradient_checkpointing": False, "max_steps": 50, "hours": 0.01, "data": "snli"}
    save_run_config(run, settings)
    assert settings_for_base_model(run, settings, CPU, None) == (settings, [])
    updated, notes = settings_for_base_model(run, settings, CPU, "all-MiniLM-L6-v2")
    assert updated["base_model"] == "all-MiniLM-L6-v2" and updated["preset"] == "custom"
    assert updated["max_steps"] != 50 and updated["data"] == "snli"
    assert "01_setup planned none (from scratch); re-planned" in notes[0]
    assert read_run_config(run) == updated
    (run.folder / "metrics.jsonl").write_text("{}\n")  # the run has started
    kept, notes = settings_for_base_model(run, updated, CPU, None)
    assert kept == updated and "keeps it" in notes[0] and read_run_config(run) == updated
