import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import ckpt  # noqa: E402


@pytest.fixture(scope="session")
def ds_pair(tmp_path_factory):
    """Two related FP8 DeepSeek-V3 parents (base 'v3', 'r1'), 3 shards, scales split across shards."""
    root = tmp_path_factory.mktemp("ds")
    sd, cfg = ckpt.ds_state(0)
    sd2 = ckpt.perturb(sd, 1, scale=0.3)
    a = ckpt.write(root / "v3", sd, cfg, "fp8", shards=3, split_scale=True)
    b = ckpt.write(root / "r1", sd2, cfg, "fp8", shards=2)
    return a, b, sd, sd2, cfg


@pytest.fixture(scope="session")
def chimera_server():
    """`chimera serve tiny-r1` on a free localhost port, with an API key, for the whole session."""
    import served

    s = served.chimera_serve("tiny-r1", "--max-queue", "12", "--max-batch", "4")
    yield s
    s.stop()
