"""What the notebooks decide from the machine: the preset for a GPU's memory, the backup folder, and the
run configuration they pass on."""
import pytest

from nsa_lib.config import NSAConfig, estimate_training_memory
from nsa_lib.environment import (Environment, choose_preset, detect_environment, mount_drive_folder,
                                 read_run_config, save_run_config)

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


def test_outside_colab_backups_go_to_a_local_folder(tmp_path):
    folder, note = mount_drive_folder("nsa/run1", fallback=tmp_path / "backups")
    assert folder == tmp_path / "backups" / "nsa" / "run1" and folder.is_dir()
    assert "not in Colab" in note


def test_run_config_round_trip_and_missing(tmp_path):
    path = save_run_config({"preset": "tiny", "output_dir": "runs/x"}, tmp_path / "run.json")
    assert read_run_config(path) == {"preset": "tiny", "output_dir": "runs/x"}
    with pytest.raises(FileNotFoundError, match="run notebooks/01_setup.ipynb first"):
        read_run_config(tmp_path / "missing.json")


def test_this_machine():
    env = detect_environment()
    assert env.cpu_count >= 1 and (env.gpu_name is None) == (env.gpu_memory_bytes is None)
