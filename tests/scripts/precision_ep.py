"""RouterPrecision and NonFiniteGuard under ``strategy="moe"`` and bf16-true, for tests/test_precision.py.

Usage: ``python precision_ep.py`` (Lightning's popen launcher starts the other rank). Four steps on 2
processes; at step 2 rank 1 alone adds a non-finite loss term. Every rank writes the parameter and router
logit dtypes, the guard's skipped steps and which steps left the weights unchanged to ``rank{r}.json``.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import lightning_moe  # noqa: E402, F401  (registers strategy="moe")
from lightning_moe.callbacks import NonFiniteGuard, RouterPrecision  # noqa: E402

from script_io import main, write_result  # noqa: E402
from test_precision import TinyMoEModel, _data, _DtypeProbe, _same, _trainer, _WeightTrace  # noqa: E402


class RankLocalInf(TinyMoEModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        # rank 1 only, step 2: a non-finite loss term without parameters; every gradient stays finite
        return loss + (math.inf if self.global_rank == 1 and batch_idx == 2 else 0.0)


def body() -> None:
    torch.manual_seed(0)
    model = RankLocalInf()
    probe, guard, trace = _DtypeProbe(), NonFiniteGuard(), _WeightTrace()
    t = _trainer(strategy="moe", devices=2, precision="bf16-true", max_steps=4, use_distributed_sampler=False,
                 callbacks=[RouterPrecision(), probe, guard, trace])
    t.fit(model, _data())
    out = {"dtypes": {k: str(v) for k, v in probe.records[-1].items()},
           "logits": sorted({str(d) for d in probe.logits_dtypes}), "skipped": guard.skipped_steps,
           "unchanged": [_same(b, a) for b, a in zip(trace.before, trace.after, strict=False)]}
    write_result(out, rank=t.global_rank)


if __name__ == "__main__":
    main(body)
