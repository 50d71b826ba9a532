"""The data preflight: every image and label a run reads is checked before step 0 trains.

A run reads the training split and, for the test after every step, the whole
validation split; both are checked in the pass that derives their class lists
(:func:`datasets.class_lists.check_split`, cached, so a dataset is read once). All
bad samples are reported at once: the first ten in the error, every one in
the run folder's list (``RunFolder.bad_files_list``). ``data.skip_bad_files: true`` leaves them out
of training and testing instead; the count goes to the log and ``results.json``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from utils.config import DataConfig
from utils.files import atomic_write_text

from .class_lists import BadFilesError, check_split, describe_bad_samples, load_class_lists

SPLITS = ("train", "val")


def prepare_run_data(data: DataConfig, report: Path, log: logging.Logger) -> dict[str, int]:
    """Everything a run needs of its data before step 0: the synthetic dataset generated if the config asks for
    it, every sample checked (:func:`preflight`), and a given class-list file read (it must cover the training
    split). Returns the number of bad samples of each split."""
    ensure_synthetic_data(data)
    skipped = preflight(data.dataset, data.root, data.cache_dir, data.skip_bad_files, report, log)
    if data.class_lists:
        load_class_lists(data.dataset, data.root, "train", data.class_lists, data.cache_dir,
                         skip_bad_files=data.skip_bad_files)
    return skipped


def ensure_synthetic_data(data: DataConfig) -> None:
    """Generate the built-in synthetic dataset at data.root if the config asks for it and it is absent."""
    if data.synthetic.enabled:
        from .synthetic import ensure_synthetic
        ensure_synthetic(data.root, num_train=data.synthetic.num_train, num_val=data.synthetic.num_val,
                         image_size=data.synthetic.image_size, seed=data.synthetic.seed)


def preflight(dataset: str, root: str, cache_dir: Optional[str], skip_bad_files: bool, report: Path,
              log: logging.Logger, progress: bool = True) -> dict[str, int]:
    """Check both splits; refuse bad samples (one line, all of them in ``report``, the run folder's list)
    unless ``skip_bad_files``. Returns the number of bad samples of each split (those a skipping run leaves
    out)."""
    checks = {split: check_split(dataset, root, split, cache_dir, progress) for split in SPLITS}
    problems = [problem for check in checks.values() for problem in check.bad.values()]
    counts = {split: len(check.bad) for split, check in checks.items()}
    report = Path(report)
    if not problems:
        report.unlink(missing_ok=True)  # from an earlier session, before the data was fixed
        return counts
    atomic_write_text(report, "".join(f"{split}\t{problem}\n" for split, check in checks.items()
                                      for problem in check.bad.values()))
    total = sum(len(check.files) for check in checks.values())
    found = (f"{len(problems)} of the {total} samples under {root} cannot be used ({counts['train']} train, "
             f"{counts['val']} val; all listed in {report})")
    if not skip_bad_files:
        raise BadFilesError(f"data preflight: {found}: {describe_bad_samples(problems)}. Fix or remove them, or "
                            "set data.skip_bad_files=true to train and test without them")
    log.warning("data preflight: %s; data.skip_bad_files is set: training and testing without them", found)
    return counts
