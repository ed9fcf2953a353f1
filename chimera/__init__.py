"""chimera: training-free customization of Mixture-of-Experts LLMs.

`chimera.merge(recipe, out)` builds an Assembly-of-Experts child checkpoint (`chimera.merge` is also the
package: `chimera.merge.Recipe`, `chimera.merge.convert`, ...). Subpackages load on first use, so
`import chimera` and the command line stay fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["merge", "__version__"]


def __getattr__(name: str):
    if name in ("merge", "moe", "eval", "zoo", "checkpoint", "sweep", "report"):
        return importlib.import_module(f"chimera.{name}")
    raise AttributeError(f"module 'chimera' has no attribute {name!r}")
