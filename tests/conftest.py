import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shakespeare_path() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"{path} not present (the shared data folder sits beside the repository)")
    return path


@pytest.fixture(scope="session")
def pydoc_dir(tmp_path_factory) -> Path:
    """The built-in Python docs corpus prepared once for the whole session (configs/tiny.yaml's data)."""
    from s2moe_ds.config import load_config
    from s2moe_ds.data.prepare import prepare_config

    d = tmp_path_factory.mktemp("shared-data") / "pydoc"
    prepare_config(load_config(REPO / "configs" / "tiny.yaml", [f"data.data_dir={d}"]).data)
    return d


@pytest.fixture
def bin_dir() -> Path:
    """Folder of the interpreter running the tests (deepspeed / s2moe console scripts live there)."""
    return Path(sys.executable).parent


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
