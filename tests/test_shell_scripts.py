"""main.sh and download_voc.sh as users start them: with `sh` (dash on Debian/Ubuntu) as well as with bash."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VOC_TASKS = ["15-1", "15-5", "10-1", "19-1", "5-3", "2-2"]

# /bin/sh is whatever the machine has; dash is named too, so the test means the same where sh is bash.
SHELLS = ["/bin/sh", "dash", "bash"]


def run_script(shell: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run([shell, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("shell", SHELLS)
def test_main_sh_dry_run_prints_every_voc_command(shell):
    # PYTHON=false: a command that ran instead of being printed would stop the script with exit 1.
    done = run_script(shell, ["main.sh", "voc"], {"DRY_RUN": "1", "PYTHON": "false", "GPUS": "1", "OUT": "runs",
                                                  "METHOD": "mbs", "VOC_ROOT": "data", "EXTRA": ""})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    runs = [f"voc_{task}_{setting}_r101_mbs" for task in VOC_TASKS for setting in ("overlapped", "disjoint")]
    assert len(lines) == len(runs) + 1
    for line, name in zip(lines, runs):
        assert line.startswith(f"+ false main.py --config configs/voc.yaml --resume --opt name={name} ")
    assert lines[-1].startswith(f"+ false -m analysis.report runs/{runs[0]} ")
    assert lines[-1].endswith("--out runs/summary_voc_mbs.md --plot runs/summary_voc_mbs.png --published")


@pytest.mark.parametrize("shell", SHELLS)
def test_main_sh_dry_run_runs_every_method_of_a_list(shell):
    """METHOD="mbs mib plop": the whole VOC suite once per method, each run named after its method (no two runs
    share a folder), then one summary of all of them."""
    done = run_script(shell, ["main.sh", "voc"], {"DRY_RUN": "1", "PYTHON": "false", "GPUS": "1", "OUT": "runs",
                                                  "METHOD": "mbs mib plop", "VOC_ROOT": "data", "EXTRA": ""})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    methods = ["mbs", "mib", "plop"]
    runs = [(method, f"voc_{task}_{setting}_r101_{method}")
            for method in methods for task in VOC_TASKS for setting in ("overlapped", "disjoint")]
    assert len(lines) == len(runs) + 1
    for line, (method, name) in zip(lines, runs):
        assert line.startswith(f"+ false main.py --config configs/voc.yaml --resume --opt name={name} ")
        assert f" method.name={method} " in line
    summary = lines[-1].split()
    assert summary[:4] == ["+", "false", "-m", "analysis.report"]
    assert summary[4:-5] == [f"runs/{name}" for _, name in runs]
    assert summary[-5:] == ["--out", "runs/summary_voc_mbs-mib-plop.md", "--plot", "runs/summary_voc_mbs-mib-plop.png",
                            "--published"]


@pytest.mark.parametrize("shell", SHELLS)
def test_download_voc_sh_help(shell):
    done = run_script(shell, ["download_voc.sh", "--help"], {})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m datasets.download voc")
    for option in ("--trainval-url", "--aug-url", "--trainval-checksum", "--keep-archives"):
        assert option in done.stdout
