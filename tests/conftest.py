import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_chromium() -> str:
    """The Chromium binary for the real-browser report checks, or skip the test saying so; with
    CLIP_DISTILL_REQUIRE_CHROMIUM=1 (.ci/run, which installs it) a missing browser fails instead."""
    from scripts.check_report_html import find_chromium

    binary = find_chromium()
    if binary is None:
        message = "needs Chromium (Debian: apt-get install -y chromium); absent here"
        if os.environ.get("CLIP_DISTILL_REQUIRE_CHROMIUM", "") not in ("", "0"):
            pytest.fail(message + ", and CLIP_DISTILL_REQUIRE_CHROMIUM is set")
        pytest.skip(message)
    return binary


def require_shared(sub: str = "") -> Path:
    """Path into ../shared/data, or skip the test with a clear message when it is absent."""
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"needs {path} (the offline data folder beside the repo); it is absent here")
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from clipcore.testing import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir):
    from clipcore.loading import load_teacher

    return load_teacher(str(tiny_clip_dir))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; each in-process training run may pick another
    precision or device, so every test starts and ends without one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
