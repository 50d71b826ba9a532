"""The run folder (``output_dir/name``): the one object that knows every path in it.

A run folder holds::

    config.yaml                      the resolved config (what --resume compares)
    log.txt                          the run's log
    tensorboard/                     scalars and images
    checkpoints/step{t}.pt           the finished step t: weights, metrics, the config and task that made them
    checkpoints/step{t}_partial.pt   the in-step state of a step still running (--resume continues it)
    checkpoints/step{t}_best.pt      the best-so-far weights of step t (checkpoint_policy=best)
    results.json, results.md         the metrics of every finished step (written after each)
    bad_files.txt                    the data preflight's list of unusable samples, if any
    run.lock                         locked by the run using the folder; holds its pid and host
    .ranks_<nonce>.token             for a moment at the start of a multi-process run: every rank must read it

A finished-step file is only ever written complete, so its presence means the step is done; ``--resume``
never retrains it. Before a run starts (:meth:`RunFolder.prepare`): the folder must be writable, finished
work is never overwritten without ``--resume``, ``--resume`` continues only the same experiment, what an
interrupted write left is removed, and the resolved config is saved. No other module spells a file name
of the run folder. While a run uses the folder, its rank 0 holds :meth:`RunFolder.lock`, so a second run
started into the same folder stops at once instead of overwriting the first one's work.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from utils import checkpoint as ckpt
from utils.config import (HARMLESS_KEYS, Config, ConfigError, UniqueKeyLoader, config_from_dict, config_yaml,
                          resolved_config_items)
from utils.distributed import all_gather_object, broadcast_object
from utils.errors import UserError
from utils.files import TEMPORARY_PATTERN, atomic_write_text, read_text, temporary_sibling
from utils.results import results_markdown


class RunFolderError(UserError):
    """The run folder cannot be used as asked (not creatable, in use by another run, finished work would be
    overwritten, ...)."""


# Bytes the writability probe writes: enough that a full disk fails it, as an empty file would not.
PROBE_BYTES = 64 * 1024
# flock's answers on a file system that does not lock (e.g. Lustre mounted without -o flock).
# How long a rank waits for rank 0's token to appear (a shared file system may show a new file late).
TOKEN_WAIT_S = 10.0
LOCKING_UNSUPPORTED = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


def config_differences(saved: Config, current: Config) -> dict[str, tuple[Any, Any]]:
    """key -> (saved value, current value) for every key whose value differs; the method keys a preset
    resolves are compared resolved (a weight written out as its preset's value is no difference)."""
    before, now = resolved_config_items(saved), resolved_config_items(current)
    return {key: (before[key], now[key]) for key in now if before[key] != now[key]}


class RunFolder:
    """``output_dir/name``: the paths of everything a run writes there, and the operations on them."""

    CHECKPOINTS = "checkpoints"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------ paths
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log_file(self) -> Path:
        return self.path / "log.txt"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def results_json(self) -> Path:
        return self.path / "results.json"

    @property
    def results_md(self) -> Path:
        return self.path / "results.md"

    @property
    def bad_files_list(self) -> Path:
        return self.path / "bad_files.txt"

    @property
    def qualitative_figure(self) -> Path:
        """Where ``python -m analysis.report RUN --qualitative N`` draws by default."""
        return self.path / "qualitative.png"

    @property
    def lock_file(self) -> Path:
        """flock-ed by rank 0 of the run using the folder (:meth:`lock`); holds that process's pid and host."""
        return self.path / "run.lock"

    def ranks_token(self, nonce: str) -> Path:
        """Written by rank 0 at the start of a multi-process run, read by every rank (:meth:`check_shared_by_ranks`),
        then removed; a fresh name per run, so no node can have cached an earlier one."""
        return self.path / f".ranks_{nonce}.token"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    def finished_checkpoint(self, step: int) -> Path:
        return self.checkpoint_dir / f"step{step}.pt"

    def partial_checkpoint(self, step: int) -> Path:
        return self.checkpoint_dir / f"step{step}_partial.pt"

    def best_checkpoint(self, step: int) -> Path:
        return self.checkpoint_dir / f"step{step}_best.pt"

    # ------------------------------------------------------------ what is there
    def looks_like_a_run(self) -> bool:
        """What a run leaves from its start on: the saved config, then checkpoints, then results."""
        return self.path.is_dir() and any(p.exists() for p in (self.results_json, self.checkpoint_dir,
                                                               self.config_file))

    def is_finished(self, step: int) -> bool:
        return self.finished_checkpoint(step).exists()

    def finished_steps(self) -> list[int]:
        """Every finished step, in order (not the in-step or best files)."""
        steps = []
        for path in self.checkpoint_dir.glob("step*.pt"):
            suffix = path.stem[len("step"):]
            if suffix.isdigit():
                steps.append(int(suffix))
        return sorted(steps)

    def has_checkpoints(self) -> bool:
        return any(self.checkpoint_dir.glob("*.pt"))

    def load_finished(self, step: int, map_location: Any = "cpu") -> dict:
        return ckpt.load(self.finished_checkpoint(step), map_location)

    def finished_metrics(self, steps: range) -> list[dict]:
        """The metrics of those of ``steps`` that are finished, from their checkpoints."""
        return [self.load_finished(step)["metrics"] for step in steps if self.is_finished(step)]

    def sibling_step0_checkpoints(self) -> Iterator[Path]:
        """The finished step-0 checkpoints of the other run folders of this one's ``output_dir``."""
        own = self.finished_checkpoint(0).resolve()
        for sibling in sorted(self.path.parent.iterdir()) if self.path.parent.is_dir() else ():
            candidate = RunFolder(sibling).finished_checkpoint(0)
            if candidate.is_file() and candidate.resolve() != own:
                yield candidate

    # ------------------------------------------------------------ writing
    def save_finished_step(self, step: int, state: dict) -> None:
        """The step's checkpoint, then its in-step files are removed: from here on the step is finished."""
        ckpt.save_atomic(state, self.finished_checkpoint(step))
        self.remove_in_step_files(step)

    def remove_in_step_files(self, step: int) -> list[Path]:
        """The in-step and best files of ``step`` (left when a run was killed between writing the finished
        checkpoint and removing them); returns those removed."""
        removed = []
        for leftover in (self.partial_checkpoint(step), self.best_checkpoint(step)):
            if leftover.exists():
                leftover.unlink()
                removed.append(leftover)
        return removed

    def write_results(self, results: list[dict], meta: dict) -> None:
        """results.json and results.md (atomically: a reader never sees half a file)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.results_json, json.dumps({"meta": meta, "steps": results}, indent=1) + "\n")
        atomic_write_text(self.results_md, results_markdown(meta.get("name", self.path.name), results, meta))

    def read_results(self) -> dict:
        """results.json's content; a :class:`RunFolderError` when it is missing, unreadable or empty."""
        path = self.results_json
        if not path.is_file():
            raise RunFolderError(f"{path} does not exist (has the run finished a step?)")
        try:
            content = json.loads(path.read_text())
        except ValueError as err:
            raise RunFolderError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(content, dict) or not content.get("steps"):
            raise RunFolderError(f"{path} holds no step results")
        return content

    def read_config_dict(self) -> dict:
        """config.yaml as plain values ({} when there is none); a :class:`RunFolderError` when it is not YAML."""
        if not self.config_file.is_file():
            return {}
        try:
            return yaml.load(read_text(self.config_file, "the saved config"), Loader=UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise RunFolderError(f"{self.config_file} is not valid YAML: {err}") from None
        except UserError as err:  # not UTF-8, unreadable
            raise RunFolderError(str(err)) from None

    # ------------------------------------------------------------ before a run
    @contextlib.contextmanager
    def lock(self, log: logging.Logger) -> Iterator[None]:
        """Hold the folder for one run (rank 0 only): an exclusive, non-blocking ``flock`` on :attr:`lock_file`.
        A second run into the folder gets a :class:`RunFolderError` naming the holder's pid and host. The OS
        releases the lock when the holder dies, even by SIGKILL, so a stale file never blocks a later run; the
        file itself stays (removing it would let two runs lock two different files of the same name)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # never O_TRUNC: until the lock is ours, the file holds the holder's pid and host
            descriptor = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunFolderError(f"cannot lock the run folder {self.path} (output_dir/name): {self.lock_file}: "
                                 f"{err.strerror or err}") from err
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunFolderError(f"run folder {self.path} (output_dir/name) is in use by another run "
                                     f"({self.lock_holder()}; lock file {self.lock_file}): wait for it to end, or "
                                     "choose another name/output_dir") from None
            except OSError as err:
                if err.errno not in LOCKING_UNSUPPORTED:
                    raise RunFolderError(f"cannot lock the run folder {self.path} (output_dir/name): "
                                         f"{self.lock_file}: {err.strerror or err}") from err
                log.warning("the run folder %s cannot be locked (%s): nothing stops a second run started into it "
                            "from overwriting this one's files", self.path, err.strerror or err)
                yield
                return
            try:
                os.ftruncate(descriptor, 0)
                os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode())
            except OSError as err:  # a full disk (the lock is still held: the pid is only for the message)
                raise RunFolderError(f"the run folder {self.path} (output_dir/name) is not writable: "
                                     f"{self.lock_file}: {err.strerror or err}") from err
            try:
                yield
            finally:
                # emptied, so that a run refused in the instant before the next holder writes its own pid
                # never names this finished one
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, 0)
        finally:
            os.close(descriptor)  # releases the lock

    def lock_holder(self) -> str:
        """Who holds :attr:`lock_file`, as the holder wrote it: "pid P on host H"."""
        try:
            pid, host = self.lock_file.read_text().split()
        except (OSError, UnicodeDecodeError, ValueError):  # taken an instant ago, pid not written yet
            return "its pid and host are not written yet"
        return f"pid {pid} on host {host}"

    def check_writable(self) -> None:
        """Create the folder if needed and make sure files can be written in it; refuse in one line otherwise."""
        for folder in (self.path, *self.path.parents):
            if folder.exists():
                if not folder.is_dir():
                    raise RunFolderError(f"cannot create the run folder {self.path} (output_dir/name): {folder} is "
                                         "a file, not a folder")
                break
        probe = temporary_sibling(self.path / "write_test")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # Real bytes, on disk: an empty file is created even on a full disk, which training would find
            # only when it saves. Random bytes, which a compressing file system cannot shrink.
            probe.write_bytes(os.urandom(PROBE_BYTES))
            descriptor = os.open(probe, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError as err:
            raise RunFolderError(f"the run folder {self.path} (output_dir/name) is not writable: "
                                 f"{err.strerror or err}") from err
        finally:
            # missing_ok: a run already holding the folder removes stale temporary files, this probe included
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)

    def read_saved_config(self) -> Config:
        try:
            return config_from_dict(yaml.load(read_text(self.config_file, "the saved config"),
                                              Loader=UniqueKeyLoader) or {})
        except (OSError, UserError, yaml.YAMLError) as err:
            raise RunFolderError(f"--resume: the run's saved config {self.config_file} cannot be read ({err}); "
                                 "restore it, or choose another name/output_dir") from None

    def saved_records(self) -> Iterator[tuple[Path, Config, Optional[list]]]:
        """(file, config, task steps) of what the folder says it was trained with: config.yaml (no task), then
        the record every finished checkpoint carries (so a lost or edited config.yaml is not the only witness)."""
        if self.config_file.exists():
            yield self.config_file, self.read_saved_config(), None
        for step in self.finished_steps():
            path = self.finished_checkpoint(step)
            saved = ckpt.load(path, mmap=True)  # the record only: the weights are mapped, not read
            if "config" not in saved:
                continue
            try:
                yield path, config_from_dict(saved["config"]), saved.get("task")
            except ConfigError as err:
                raise RunFolderError(f"--resume: {path} records a config this version cannot read ({err}); "
                                     "choose another name/output_dir") from None

    def check_same_experiment(self, cfg: Config, task_steps: list, log: logging.Logger) -> None:
        """--resume into a folder that holds checkpoints: refuse a config whose experiment keys or task differ
        from what the folder was trained with (naming every such key and both values); warn about harmless
        differences from the saved config.yaml."""
        for source, saved, saved_steps in self.saved_records():
            differences = config_differences(saved, cfg)
            # a key in neither set (none should be) counts as an experiment key
            experiment = {key: values for key, values in differences.items() if key not in HARMLESS_KEYS}
            listed = [f"{key}: {old!r} (saved) vs {new!r} (now)" for key, (old, new) in experiment.items()]
            if saved_steps is not None and [list(s) for s in saved_steps] != [list(s) for s in task_steps]:
                listed.append(f"the task's classes per step: {saved_steps} (saved) vs {task_steps} (now)")
            if listed and self.has_checkpoints():
                raise RunFolderError(f"--resume: run folder {self.path} was trained with another experiment "
                                     f"config ({source}): {'; '.join(listed)}. Resume with the saved values, or "
                                     "choose another name/output_dir for the new recipe")
            harmless = {key: values for key, values in differences.items() if key in HARMLESS_KEYS}
            if harmless and source == self.config_file:
                log.warning("--resume: the config differs from %s in keys that do not change results: %s",
                            source, "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in harmless.items()))

    def prepare(self, cfg: Config, task_steps: list, resume: bool, log: logging.Logger) -> None:
        """Check the folder, refuse to overwrite finished work unless resuming (and then only with the same
        experiment: ``cfg`` and the classes of each step, ``task_steps``), remove stale temporary files, save
        the config (atomically: a run killed while saving it leaves the previous one)."""
        self.check_writable()
        done = sorted(self.checkpoint_dir.glob("step*.pt"))  # finished or in-step: work a new run would lose
        if done and not resume:
            raise RunFolderError(f"run folder {self.path} already holds checkpoints ({done[0].name}, ...): "
                                 "pass --resume to continue it, or choose another name/output_dir")
        if resume:
            self.check_same_experiment(cfg, task_steps, log)
        # Temporary files of an atomic write cut short (the process was killed while saving), tokens of a
        # multi-process start that was killed.
        for stale in [*self.path.glob(TEMPORARY_PATTERN), *self.checkpoint_dir.glob(TEMPORARY_PATTERN),
                      *self.path.glob(self.ranks_token("*").name)]:
            log.info("removing %s (left by an interrupted write)", stale)
            stale.unlink()
        atomic_write_text(self.config_file, config_yaml(cfg))

    def check_shared_by_ranks(self, rank: int, world_size: int) -> None:
        """Every rank of a multi-process run must see this folder: rank 0 writes the checkpoints and every rank
        reads them (the next step's start, --resume). Rank 0 writes a token, every rank reads it; when a rank
        cannot (a node without the shared file system), every rank raises the same :class:`RunFolderError` now,
        instead of a missing checkpoint after the first step. A collective: every rank calls it."""
        if world_size < 2:
            return
        nonce = None
        if rank == 0:
            nonce = os.urandom(8).hex()
            try:
                atomic_write_text(self.ranks_token(nonce), f"{nonce}\n")
            except OSError:
                nonce = None  # every rank reports it below
        nonce = broadcast_object(nonce)
        seen = nonce is not None and self._token_appears(self.ranks_token(nonce), nonce)
        everyone = all_gather_object((seen, socket.gethostname()))
        if rank == 0 and nonce is not None:
            with contextlib.suppress(OSError):
                self.ranks_token(nonce).unlink()
        blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(everyone) if not ok]
        if blind:
            raise RunFolderError(f"{', '.join(blind)} cannot read the token rank 0 wrote into the run folder "
                                 f"{self.path} (output_dir/name): rank 0 writes the checkpoints and every rank reads "
                                 "them, so every node needs that folder on a shared file system (set output_dir to one)")

    @staticmethod
    def _token_appears(path: Path, nonce: str) -> bool:
        deadline = time.monotonic() + TOKEN_WAIT_S
        while True:
            try:
                if path.read_text().strip() == nonce:
                    return True
            except OSError:
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
