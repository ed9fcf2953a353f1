"""Where chimera keeps its per-user caches (built kernels, derived architecture tables): `$CHIMERA_CACHE`, else
`$XDG_CACHE_HOME/chimera`, else `~/.cache/chimera`. Everything in it can be deleted; it is rebuilt on use."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("CHIMERA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chimera"))
