import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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
