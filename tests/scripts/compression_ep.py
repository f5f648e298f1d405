"""int8 and low-rank compression callbacks under expert parallelism, for tests/test_compression.py.

Usage: ``python compression_ep.py`` (Lightning's popen launcher starts the other rank). For each method, every
rank fits ``TinyModule`` with ``strategy="moe"`` on 2 processes, tests it with the compression callback, and
writes the test loss, the single-process compressed model's loss and what the layer holds to ``rank{r}.json``.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lightning_moe  # noqa: E402, F401  (registers strategy="moe")
from lightning_moe.callbacks import ExpertQuantization, LowRankExperts  # noqa: E402
from lightning_moe.compress import low_rank_experts, quantize_experts  # noqa: E402

from script_io import main, write_result  # noqa: E402
from test_compression import TinyModule, _loader  # noqa: E402


def make(callbacks) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=2, strategy="moe", max_steps=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False, callbacks=callbacks)


def body() -> None:
    out = {}
    for name, callback, compress in (("int8", ExpertQuantization(), quantize_experts),
                                     ("lowrank", LowRankExperts(rank=4), lambda m: low_rank_experts(m, rank=4))):
        torch.manual_seed(0)
        model = TinyModule()
        make([]).fit(model, _loader())  # the end of fit gathers the experts: full model on every rank
        reference = copy.deepcopy(model)
        compress(reference)
        t = make([callback])
        (result,) = t.test(model, _loader(), verbose=False)
        x, y = next(iter(_loader()))
        with torch.no_grad():
            expected = sum(F.mse_loss(reference(xb), yb).item() for xb, yb in _loader()) / len(_loader())
            out[name] = {"test_loss": result["test_loss"], "expected": expected,
                         "num_experts": model.net.moe1.experts.num_experts,
                         "same_outputs": torch.allclose(model(x), reference(x), atol=1e-6),
                         "local_report": callback.report.layers[0].params_after,
                         "bank": type(model.net.moe1.experts).__name__}
    write_result(out, rank=t.global_rank)


if __name__ == "__main__":
    main(body)
