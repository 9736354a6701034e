"""paramcalc: exact, explained parameter counts for transformer fine-tuning.

    >>> import paramcalc
    >>> paramcalc.count("bert-base-uncased", task="seq-cls").total_params
    109483778
"""

from .counting import CountResult, count
from .errors import ParamcalcError

__version__ = "0.1.0"
__all__ = ["count", "CountResult", "ParamcalcError", "__version__"]
