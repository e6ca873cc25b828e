"""Every task composes at every scale, every paper composes, and the config groups hold what the suite needs."""
import pytest
from omegaconf import OmegaConf

from conftest import PAPERS, SCALES, TASKS


def test_groups_are_present():
    assert SCALES == ["paper", "small", "smoke"]
    assert "flash_kernel" in TASKS
    assert PAPERS, "no paper configs"


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_composes_at_every_scale(compose, task, scale):
    cfg = compose(f"task={task}", f"scale={scale}")
    assert cfg.task.name == task
    assert cfg.scale.name == scale
    assert ":" in cfg.task.entry
    # every interpolation resolves (hydra's own job fields are filled in only at launch)
    OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


# paper scale is left out: several of its tasks read hub models or datasets, which validate refuses offline
@pytest.mark.parametrize("scale", ["smoke", "small"])
@pytest.mark.parametrize("task", TASKS)
def test_every_tasks_own_config_passes_its_validate(compose, task, scale):
    from repro.cli import load_task
    cfg = compose(f"task={task}", f"scale={scale}")
    _, validate, _ = load_task(cfg.task.entry)
    if validate is not None:
        validate(cfg)


@pytest.mark.parametrize("paper", PAPERS)
def test_every_paper_is_a_multirun_over_known_tasks(compose, paper):
    cfg = compose(f"paper={paper}")
    assert cfg.hydra.mode.name == "MULTIRUN"
    tasks = str(cfg.hydra.sweeper.params.task).split(",")
    assert set(tasks) <= set(TASKS)
    for task in tasks:
        assert compose(f"paper={paper}", f"task={task}").task.paper == paper


def test_scale_presets_differ_per_task(compose):
    smoke, small = compose("scale=smoke"), compose("scale=small")
    assert smoke.kernel.dtype == "float32" and small.kernel.dtype == "bfloat16"
    assert max(smoke.kernel.seq_len) < min(small.kernel.seq_len)


def test_command_line_overrides_beat_the_scale_preset(compose):
    cfg = compose("scale=smoke", "kernel.seq_len=[32]")
    assert list(cfg.kernel.seq_len) == [32]


def test_launcher_presets_compose(compose):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    assert compose("hydra/launcher=local").hydra.launcher.gpus_per_node == 1  # 0 would hide the GPU from the jobs
    assert compose("hydra/launcher=slurm").hydra.launcher.gpus_per_node == 1
