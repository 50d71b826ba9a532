"""A full disk and a run folder used by two runs at once.

The full-disk tests fill a real file system: a small tmpfs, mounted in a private mount namespace
(``unshare --mount``) by a subprocess that runs a short script on it, so what torch, tensorboard and the
kernel really do on ENOSPC is what is tested, and nothing outside that subprocess sees the mount. They are
skipped, saying why, where ``unshare`` or ``mount`` is not permitted (they need root, as CI has).
The script reports what it finds on the tmpfs as JSON on its last stdout line.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.test_main_e2e import ROOT, assert_clean_user_error, main_argv, run_in_process, run_options
from utils.errors import UserError
from utils.run_folder import RunFolder, RunFolderError

TMPFS_SIZE = "1m"

# What every script on the tmpfs starts with: the project importable, where the tmpfs is, and two helpers.
PRELUDE = f"""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from utils.errors import UserError, one_line
TMPFS = Path(sys.argv[1])


def fill_disk(leave=0):
    '''Take the free space of the tmpfs, all but ``leave`` bytes.'''
    stat = os.statvfs(TMPFS)
    descriptor = os.open(TMPFS / "filler", os.O_WRONLY | os.O_CREAT)
    os.posix_fallocate(descriptor, 0, max(stat.f_bavail * stat.f_frsize - leave, 1))
    os.close(descriptor)


def as_main(action):
    '''What main.py does with an error: a UserError is one line on stderr (exit code 2), anything else a
    traceback.'''
    try:
        action()
    except UserError as err:
        print(f"ERROR {{type(err).__name__}}: {{one_line(err)}}", file=sys.stderr)
        return 2
    return 0
"""


def tmpfs_command(mount_point: Path, *command: str) -> list[str]:
    """``command`` in a private mount namespace with a tmpfs of TMPFS_SIZE mounted at ``mount_point``."""
    mount_and_run = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount_and_run, "sh", TMPFS_SIZE,
            str(mount_point), *command]


@pytest.fixture(scope="session")
def tmpfs_permitted(tmp_path_factory) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command: cannot mount a private tmpfs to fill")
    mount_point = tmp_path_factory.mktemp("tmpfs_check")
    check = subprocess.run(tmpfs_command(mount_point, "true"), capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        pytest.skip(f"mounting a tmpfs in a private mount namespace is not permitted here (needs root): "
                    f"{check.stderr.strip()}")


@pytest.fixture
def on_small_tmpfs(tmpfs_permitted, tmp_path):
    """Runs a Python script (after PRELUDE) on a fresh tmpfs of TMPFS_SIZE; returns the finished process and
    the JSON the script printed last."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()

    def run(script: str) -> tuple[subprocess.CompletedProcess, dict]:
        code = PRELUDE + textwrap.dedent(script)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run(tmpfs_command(mount_point, sys.executable, "-c", code, str(mount_point)), cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        lines = result.stdout.strip().splitlines()
        assert lines, f"exit code {result.returncode}, no report\n{result.stderr[-3000:]}"
        return result, json.loads(lines[-1])

    return run


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """Exit code 2, no traceback, exactly one line on stderr (as main.py reports a UserError)."""
    output = f"exit code {result.returncode}\n{result.stderr[-3000:]}"
    assert result.returncode == 2 and "Traceback" not in result.stderr, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


# ------------------------------------------------------------------ a real full disk
@pytest.mark.slow
def test_a_checkpoint_bigger_than_the_disk_is_one_line(on_small_tmpfs):
    result, found = on_small_tmpfs("""
        import torch
        from utils import checkpoint as ckpt
        path = TMPFS / "checkpoints" / "step0_partial.pt"
        ckpt.save_atomic({"weights": torch.arange(5)}, path)
        code = as_main(lambda: ckpt.save_atomic({"weights": torch.zeros(1 << 20)}, path))  # 4 MiB on 1 MiB
        print(json.dumps({"path": str(path), "files": sorted(os.listdir(path.parent)),
                          "previous_kept": torch.equal(ckpt.load(path)["weights"], torch.arange(5)),
                          "free": os.statvfs(TMPFS).f_bavail * os.statvfs(TMPFS).f_frsize}))
        sys.exit(code)
    """)
    line = one_error_line(result)
    assert line == (f"ERROR FileWriteError: could not write {found['path']}: No space left on device (its previous "
                    "version is unchanged)")
    assert found["files"] == ["step0_partial.pt"] and found["previous_kept"]  # no temporary file left
    assert found["free"] > 900 * 1024  # the space the temporary file took is free again


@pytest.mark.slow
def test_results_bigger_than_the_space_left_are_one_line(on_small_tmpfs):
    result, found = on_small_tmpfs("""
        from utils.run_folder import RunFolder
        folder = RunFolder(TMPFS / "run")
        meta = {"name": "run", "task": "15-5"}
        folder.write_results([{"step": 0, "miou_all": 0.5, "iou": {"background": 0.5}}], meta)
        before = folder.results_json.read_text()
        fill_disk(leave=8 * 1024)
        many_classes = {f"class {i}": 0.5 for i in range(10000)}  # about 200 KB of JSON
        code = as_main(lambda: folder.write_results([{"step": 0, "miou_all": 0.5, "iou": many_classes}], meta))
        print(json.dumps({"path": str(folder.results_json), "files": sorted(os.listdir(folder.path)),
                          "previous_kept": folder.results_json.read_text() == before}))
        sys.exit(code)
    """)
    line = one_error_line(result)
    assert line == (f"ERROR FileWriteError: could not write {found['path']}: No space left on device (its previous "
                    "version is unchanged)")
    assert found["files"] == ["results.json", "results.md"] and found["previous_kept"]


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before_the_writer_opens", "while_logging"])
def test_tensorboard_on_a_full_disk_is_one_line(on_small_tmpfs, when):
    result, found = on_small_tmpfs(f"""
        import numpy as np
        import torch
        from utils.logs import TensorboardWriter
        folder = TMPFS / "run" / "tensorboard"
        writer = None

        def log():  # as the trainer does: log, and close the writer in any case
            global writer
            writer = TensorboardWriter(folder, True)
            try:
                if {when!r} == "while_logging":
                    fill_disk()
                for step in range(2000):
                    writer.scalars({{"loss/total": 1.0, "loss/ce": 0.5}}, step)
                    if step % 100 == 0:
                        label = torch.zeros(32, 32, dtype=torch.long)
                        writer.segmentation_images("input", torch.rand(3, 32, 32), label, label, step,
                                                   np.zeros((256, 3), np.uint8))
            finally:
                writer.close()

        if {when!r} == "before_the_writer_opens":
            fill_disk()
        code = as_main(log)
        print(json.dumps({{"folder": str(folder), "enabled": writer is not None and writer.enabled}}))
        sys.exit(code)
    """)
    line = one_error_line(result)  # also no traceback from tensorboard's writer thread
    assert line == (f"ERROR TensorboardWriteError: could not write the tensorboard events in {found['folder']}: "
                    "No space left on device")
    assert not found["enabled"]  # nothing more is logged into the broken file


@pytest.mark.slow
def test_a_full_disk_fails_the_run_folder_probe(on_small_tmpfs):
    """Through main.py: refused before the log file is opened or any data is read."""
    result, found = on_small_tmpfs(f"""
        import main
        run_dir = TMPFS / "runs" / "run"
        run_dir.mkdir(parents=True)  # an empty file could still be created in it
        fill_disk()
        code = main.main(["--config", "configs/demo.yaml", "--opt", f"output_dir={{TMPFS / 'runs'}}", "name=run",
                          "data.root={ROOT / 'no_such_data'}"])
        print(json.dumps({{"run_dir": str(run_dir), "files": sorted(os.listdir(run_dir))}}))
        sys.exit(code)
    """)
    line = one_error_line(result)
    assert line == (f"error: the run folder {found['run_dir']} (output_dir/name) is not writable: No space left on "
                    "device")
    assert found["files"] == []  # the probe is removed


# ------------------------------------------------------------------ what is and is not a failed write
def test_a_bug_inside_torch_save_keeps_its_traceback_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from utils import checkpoint as ckpt

    def buggy_save(obj, file):
        file.write(b"half a checkpoint")
        try:
            open(tmp_path / "no_such_file")  # an OSError handled on the way is not a full disk
        except FileNotFoundError:
            raise RuntimeError("a bug: size mismatch") from None

    monkeypatch.setattr(torch, "save", buggy_save)
    with pytest.raises(RuntimeError, match="a bug: size mismatch") as caught:
        ckpt.save_atomic({"weights": torch.arange(3)}, tmp_path / "step0.pt")
    assert not isinstance(caught.value, UserError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("message", [
    "PytorchStreamWriter failed writing file data/0: file write failed",  # torch.save given a path
    "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598",
])
def test_torch_writer_failures_without_an_oserror_are_one_line(tmp_path, monkeypatch, message):
    from utils import checkpoint as ckpt
    from utils.files import FileWriteError

    def failing_save(obj, file):
        file.write(b"half a checkpoint")
        raise RuntimeError(message)

    path = tmp_path / "step0.pt"
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(FileWriteError, match=f"could not write {path}: torch could not write the file") as caught:
        ckpt.save_atomic({"weights": torch.arange(3)}, path)
    assert message.splitlines()[-1] in str(caught.value) and "nothing was written" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ one run per run folder
HOLD_THE_FOLDER = """
import logging, sys, time
sys.path.insert(0, sys.argv[2])
from utils.run_folder import RunFolder
with RunFolder(sys.argv[1]).lock(logging.getLogger("holder")):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def folder_holder(tmp_path):
    """Starts a process that holds the lock of a run folder; returns (the folder, the process)."""
    run_dir = tmp_path / "runs" / "run"
    processes = []

    def start() -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD_THE_FOLDER, str(run_dir), str(ROOT)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes.append(process)
        line = process.stdout.readline()  # blocks until the lock is held (or the process ended)
        assert line == "locked\n", f"the holder did not lock {run_dir}: {process.stderr.read()}"
        return process

    yield run_dir, start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def held_by(pid: int) -> str:
    return f"is in use by another run (pid {pid} on host {socket.gethostname()};"


@pytest.mark.slow
def test_a_locked_run_folder_is_refused_until_its_holder_dies(folder_holder):
    run_dir, start = folder_holder
    log = logging.getLogger("test")
    holder = start()
    folder = RunFolder(run_dir)
    refusal = f"run folder {run_dir} (output_dir/name) {held_by(holder.pid)} lock file {folder.lock_file}): wait"
    with pytest.raises(RunFolderError, match=re.escape(refusal)):
        with folder.lock(log):
            pytest.fail("two processes hold the same run folder")
    assert folder.lock_file.read_text() == f"{holder.pid} {socket.gethostname()}\n"  # the refused try wrote nothing

    holder.send_signal(signal.SIGKILL)  # no clean-up runs: the OS releases the lock
    holder.wait()
    with folder.lock(log):
        assert folder.lock_file.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    with folder.lock(log):  # released on leaving, also in the process that held it
        pass


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    folder, log = RunFolder(tmp_path / "run"), logging.getLogger("test")
    with pytest.raises(ValueError):
        with folder.lock(log):
            raise ValueError("the run failed")
    with folder.lock(log):
        pass


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_one_line(folder_holder, tmp_path, capsys):
    run_dir, start = folder_holder
    data = tmp_path / "data"
    holder = start()
    checkpoint = run_dir / "checkpoints" / "step0.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"the first run's finished step")  # what the second run would overwrite
    result = run_in_process(main_argv(run_options(data, run_dir.parent, run_dir.name)), capsys)
    line = assert_clean_user_error(result)
    assert f"RunFolderError: run folder {run_dir} (output_dir/name) {held_by(holder.pid)}" in line
    assert checkpoint.read_bytes() == b"the first run's finished step"
    assert not data.exists()  # stopped before any data work
    assert not (run_dir / "config.yaml").exists()  # and before the run folder is prepared


def test_the_lock_file_is_neither_a_checkpoint_nor_a_leftover(tmp_path):
    from utils.config import load_config
    folder, log = RunFolder(tmp_path / "run"), logging.getLogger("test")
    with folder.lock(log):
        pass
    cfg = load_config(ROOT / "configs" / "demo.yaml", run_options(tmp_path / "data", tmp_path, "run"))
    folder.prepare(cfg, [list(range(21))], resume=False, log=log)  # no "already holds checkpoints"
    folder.prepare(cfg, [list(range(21))], resume=True, log=log)
    assert folder.lock_file.exists() and folder.finished_steps() == [] and not folder.has_checkpoints()


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    folder = RunFolder(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="test"):
        with folder.lock(logging.getLogger("test")):
            pass
    assert f"the run folder {folder.path} cannot be locked (No locks available)" in caplog.text
