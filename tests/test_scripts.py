"""The shell scripts that drive the lent GPU machines, run here with stand-ins for python3 and nvidia-smi."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None,
                                reason="needs bash and git")


def stand_ins(folder: Path, python3: str) -> dict:
    """An environment whose python3 runs the shell snippet `python3` and whose nvidia-smi prints a card."""
    folder.mkdir()
    for name, body in {"python3": python3, "nvidia-smi": 'echo "NVIDIA H200, 143771 MiB"'}.items():
        (folder / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def test_on_device_exits_with_a_failed_commands_status_and_runs_the_rest(tmp_path):
    env = stand_ins(tmp_path / "bin", "exit 0")
    out = tmp_path / "out"
    out.mkdir()

    def run(*commands):
        return subprocess.run(["bash", SCRIPTS / "on_device.sh", *commands], cwd=tmp_path, capture_output=True,
                              text=True, env={**env, "OUT": str(out), "DEADLINE_S": "60"})
    failed = run("exit 3", "touch ran_after")
    assert failed.returncode == 3 and "exit 3 after" in failed.stdout and (tmp_path / "ran_after").exists()
    assert (out / "logs.tgz").exists()
    assert run("true", "true").returncode == 0


def test_on_device_without_out_says_so_before_installing(tmp_path):
    env = stand_ins(tmp_path / "bin", f"touch {tmp_path}/installed")
    env.pop("OUT", None)
    ran = subprocess.run(["bash", SCRIPTS / "on_device.sh", "true"], cwd=tmp_path, capture_output=True, text=True,
                         env=env)
    assert ran.returncode == 2 and "OUT is not set" in ran.stderr and not (tmp_path / "installed").exists()


def test_on_device_keeps_the_last_records_archive_when_packing_the_next_one_dies(tmp_path):
    """The archive was written in place: a call cut short while packing lost the records of every command before."""
    env = stand_ins(tmp_path / "bin", "exit 0")
    # the second packing writes half an archive and dies; every other call of tar is the real one
    (tmp_path / "bin" / "tar").write_text(f"""#!/usr/bin/env bash
echo x >> {tmp_path}/tar_calls
if [ "$(wc -l < {tmp_path}/tar_calls)" -eq 2 ]; then echo partial > "$2"; exit 1; fi
exec {shutil.which("tar")} "$@"
""")
    (tmp_path / "bin" / "tar").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    write_record = "mkdir -p outputs/{0} && echo {{}} > outputs/{0}/record.json"
    subprocess.run(["bash", SCRIPTS / "on_device.sh", write_record.format("first"), write_record.format("second")],
                   cwd=tmp_path, capture_output=True, text=True, env={**env, "OUT": str(out), "DEADLINE_S": "60"})
    with tarfile.open(out / "records.tgz") as packed:
        assert packed.getnames() == ["outputs/first/record.json"]


def test_on_device_hides_a_git_from_the_commands_when_told_the_commit(tmp_path):
    """The copy on the lent machine once held a .git of an earlier commit, which the records named instead of
    REPRO_GIT_SHA's."""
    env = stand_ins(tmp_path / "bin", "exit 0")
    git(tmp_path, "init", "-q")
    (tmp_path / "out").mkdir()

    def head_seen(**extra):
        subprocess.run(["bash", SCRIPTS / "on_device.sh", "git rev-parse --git-dir > seen 2>&1 || echo none > seen"],
                       cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "OUT": str(tmp_path / "out"), "DEADLINE_S": "60", **extra})
        return (tmp_path / "seen").read_text().strip()
    assert head_seen() == ".git"
    assert head_seen(REPRO_GIT_SHA="0123abc") == "none"


def git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def history(tmp_path):
    """A repository whose check.txt reads good, good, (deleted), bad, bad: the first bad commit is the fourth."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@t")
    git(repo, "config", "user.name", "t")
    commits = []
    for content in ["good 0", "good 1", None, "bad 3", "bad 4"]:
        if content is None:
            git(repo, "rm", "-q", "check.txt")
        else:
            (repo / "check.txt").write_text(content)
            git(repo, "add", "check.txt")
        git(repo, "commit", "-qm", str(len(commits)))
        commits.append(git(repo, "rev-parse", "--short", "HEAD"))
    return repo, commits


def bisect(repo, env, *args):
    return subprocess.run(["bash", SCRIPTS / "bisect_on_device.sh", *args], cwd=repo, capture_output=True,
                          text=True, env=env)


def test_bisect_skips_a_commit_that_deleted_the_file_and_finds_the_first_bad_one(history, tmp_path):
    repo, commits = history
    env = stand_ins(tmp_path / "bin", 'grep -q good check.txt')  # "the tests": pass on a good version
    prepared = bisect(repo, os.environ, "prepare", "check.txt", commits[0])
    assert prepared.returncode == 0, prepared.stderr
    listed = (repo / ".bisect" / "commits").read_text().split()
    assert listed[1::2] == [commits[0], commits[1], commits[3], commits[4]]
    found = bisect(repo, env, "run", "check.txt", "tests/test_gpu.py")
    assert found.returncode == 0 and f"first bad: {commits[3]}" in found.stdout, found.stdout + found.stderr
    assert (repo / "check.txt").read_text() == "good 1"


def test_bisect_refuses_what_it_cannot_judge(history, tmp_path):
    repo, commits = history
    nothing_later = bisect(repo, os.environ, "prepare", "check.txt", commits[4])
    assert nothing_later.returncode == 1 and "nothing to bisect" in nothing_later.stderr
    assert bisect(repo, os.environ, "prepare", "check.txt", commits[2]).returncode == 1  # deleted there
    assert bisect(repo, os.environ, "prepare", "check.txt", commits[0]).returncode == 0
    no_tests = stand_ins(tmp_path / "bin", "exit 5")  # pytest's "no tests collected": no verdict
    stopped = bisect(repo, no_tests, "run", "check.txt", "tests/test_gpu.py")
    assert stopped.returncode == 2 and "could not run the tests" in stopped.stderr


def test_bisect_run_refuses_a_missing_bisect_folder_or_one_prepared_for_another_file(history, tmp_path):
    """Either was a silent exit 0: an empty first bad commit, or another file's versions copied over FILE."""
    repo, commits = history
    env = stand_ins(tmp_path / "bin", "exit 0")
    unprepared = bisect(repo, env, "run", "check.txt", "tests/test_gpu.py")
    assert unprepared.returncode == 2 and "prepare check.txt" in unprepared.stderr, unprepared.stdout
    assert bisect(repo, os.environ, "prepare", "check.txt", commits[0]).returncode == 0
    (repo / "other.txt").write_text("mine")
    other = bisect(repo, env, "run", "other.txt", "tests/test_gpu.py")
    assert other.returncode == 2 and "'check.txt', not of 'other.txt'" in other.stderr, other.stdout
    assert (repo / "other.txt").read_text() == "mine"


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.py")))
def test_each_python_script_imports(script):
    """What the GPU notes tell a session to run must at least load (tune_flash_gluon.py imported a removed helper)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), SCRIPTS / script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize("script", ["host_cost.py", "profile_moe.py", "tune_decode.py", "tune_flash_gluon.py"])
def test_a_gpu_probe_on_a_machine_without_one_says_so_in_one_line(script):
    """profile_moe, tune_decode and tune_flash_gluon stopped in a traceback from deep in torch.cuda (or from the
    CUDA generator's linker message) rather than saying they need a GPU."""
    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU")
    ran = subprocess.run([sys.executable, SCRIPTS / script], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2 and "needs a CUDA GPU" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr
