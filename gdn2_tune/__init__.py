"""gdn2-tune: tuned Triton kernels for Gated DeltaNet-2, their autotuner, shipped config tables and reports.

The public ops, importable as flash-linear-attention users expect::

    from gdn2_tune import chunk_gdn2, fused_recurrent_gdn2

``chunk_gdn2`` here serves the tuned config tables (gdn2_tune/ops.py); ``gdn2_tune.kernels.chunk_gdn2`` takes an
explicit config or the built-in default and never reads a table.

The subpackages live in the repository's top-level folders (``kernels/``, ``tuner/``, ``profiles/``,
``reports/``) and are installed under this one name (pyproject.toml maps them), so that ``pip install`` adds no
generic top-level package (``kernels`` is the Hugging Face hub-kernel loader's name).
"""

from pathlib import Path

# In a source checkout whose root is on sys.path (``python tune.py`` from the root, or PYTHONPATH=. on a GPU
# machine with nothing installed), this folder shadows the installed package and holds no subpackages: look for
# them in the sibling folders too. An installed copy has no pyproject.toml beside it, so this never applies there.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "kernels" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))

# The public names are the kernels package's (one list, kept there), with the ops as a user calls them: the
# dispatched chunk_gdn2 of gdn2_tune/ops.py, not the kernels-level one (explicit config or built-in default).
from gdn2_tune.kernels import *
from gdn2_tune.kernels import __all__ as __all__
from gdn2_tune.ops import auto_gdn2 as auto_gdn2
from gdn2_tune.ops import chunk_gdn2 as chunk_gdn2
from gdn2_tune.ops import fused_recurrent_gdn2 as fused_recurrent_gdn2
