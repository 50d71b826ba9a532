import os
from pathlib import Path

import pytest

import shutil

from tests.helpers import (CLEAN_TRAIN, CLEAN_VAL, IMAGE_SIZE, NUM_TRAIN, NUM_VAL, ROOT, describe, main_command, run,
                           run_options)

# The standard class lists live beside the checkout (../shared/data); never in the repository.
SHARED_DATA = Path(os.environ.get("MBS_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "voc" / "train_cls.txt").is_file():
        message = f"the standard class lists are expected in {SHARED_DATA} (set MBS_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


# ------------------------------------------------------------------ tiny runs shared by several test modules
@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """The tiny synthetic dataset, generated once per session and read by every end-to-end run."""
    from datasets.synthetic import generate
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=IMAGE_SIZE, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def finished_run(data_root, runs_dir):
    """An uninterrupted 3-step run (15 + 3 + 3 classes, 3 iterations per step), trained once per session and
    read by the end-to-end, eval-only, resume and checkpoint-trust tests (a test that changes it works on a copy)."""
    options = run_options(data_root, runs_dir, "e2e")
    result = run(main_command(options))
    assert result.returncode == 0, describe(result)
    return runs_dir / "e2e", options, result


@pytest.fixture(scope="session")
def clean_data(tmp_path_factory) -> Path:
    """A small valid synthetic dataset that the bad-input tests copy (``data_copy``) and break."""
    from datasets.synthetic import generate
    root = tmp_path_factory.mktemp("clean_data")
    generate(root, num_train=CLEAN_TRAIN, num_val=CLEAN_VAL, image_size=IMAGE_SIZE, seed=0, progress=False)
    return root


@pytest.fixture
def data_copy(clean_data, tmp_path) -> Path:
    """A private copy of the clean dataset (without a class-list cache) to break."""
    root = tmp_path / "data"
    shutil.copytree(clean_data, root, ignore=shutil.ignore_patterns("class_lists"))
    return root
