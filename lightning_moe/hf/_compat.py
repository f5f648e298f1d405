"""The transformers pieces lightning_moe.hf relies on, imported lazily, each with the version it was checked on.

transformers is an optional extra (``pip install 'lightning-moe[hf]'``): nothing here imports it at
module import time. Checked against transformers 5.25 (``tests/test_hf.py`` asserts these names exist).

- ``transformers.utils.output_capturing.install_output_capuring_hook`` (sic): the forward hook with
  which a v5 model records ``router_logits`` when called with ``output_router_logits=True``.
- ``transformers.utils.output_capturing.maybe_install_capturing_hooks``: installs a model's recording
  hooks (transformers does it lazily on the first forward that asks for outputs).
"""

from __future__ import annotations

from typing import Any

from torch import nn

MIN_VERSION = 5
INSTALL_HINT = "pip install 'lightning-moe[hf]'  (or: pip install 'transformers>=5')"


def require_transformers(caller: str) -> Any:
    """Import transformers >= 5 or raise an ``ImportError`` that says how to install it."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"{caller} needs Hugging Face transformers >= {MIN_VERSION}: {INSTALL_HINT}") from error
    major = int(str(transformers.__version__).split(".")[0])
    if major < MIN_VERSION:
        raise ImportError(f"{caller} needs transformers >= {MIN_VERSION} (the v5 MoE layout), found "
                          f"{transformers.__version__}: {INSTALL_HINT}")
    return transformers


def _output_capturing():
    from transformers.utils import output_capturing

    return output_capturing


def record_router_logits(router: nn.Module) -> None:
    """Make ``output_router_logits=True`` record this router's logits (element 0 of its output tuple)."""
    _output_capturing().install_output_capuring_hook(router, "router_logits", 0)


def install_recording_hooks(model: nn.Module) -> None:
    """Install transformers' own recording hooks now, on the modules the model holds before conversion.

    transformers installs them once, on the first forward that records outputs, by module class; after
    :func:`lightning_moe.from_hf` the HF routers are out of the tree, and after
    :func:`lightning_moe.to_hf` they would be back without hooks. Installing them first keeps them on
    the HF routers (which ``to_hf`` puts back) for good.
    """
    from transformers import PreTrainedModel

    capturing = _output_capturing()
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and "router_logits" in capturing._CAN_RECORD_REGISTRY.get(module):
            capturing.maybe_install_capturing_hooks(module)


def records_router_logits(model: nn.Module) -> bool:
    """Whether the model (or a sub-model) can record ``router_logits``."""
    from transformers import PreTrainedModel

    capturing = _output_capturing()
    return any(isinstance(m, PreTrainedModel) and "router_logits" in capturing._CAN_RECORD_REGISTRY.get(m)
               for m in model.modules())
