"""chimera: training-free customization of Mixture-of-Experts LLMs.

`chimera.merge(recipe, out)` builds an Assembly-of-Experts child checkpoint.
"""
from chimera.merge import merge

__all__ = ["merge"]
__version__ = "0.1.0"
