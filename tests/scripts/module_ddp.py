"""MoELightningModule under 2-process gloo DDP with bias balancing, for tests/test_module.py.

Usage: ``python module_ddp.py`` (Lightning's popen launcher starts the other rank). Six steps at lr=0, each
rank its own batches; every rank writes, per step, the loss the step returned and its task loss plus the
layers' aux losses, and the expert biases at the end, to ``rank{r}.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402

from script_io import main, write_result  # noqa: E402
from test_module import Tiny, ddp_batches, trainer  # noqa: E402


class Checked(Tiny):
    def training_step(self, batch, batch_idx):
        task = self.task_loss(batch)
        self.task = task.detach()
        return task

    def train_dataloader(self):
        return ddp_batches(self.global_rank)


class Record(L.Callback):
    rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        aux = sum(layer.aux_loss for layer in pl_module.layers).item()
        self.rows.append([outputs["loss"].item(), pl_module.task.item() + aux])


def body() -> None:
    torch.manual_seed(0)
    model = Checked(lr=0.0, bias_update_rate=0.05, top_k=1)
    record = Record()
    t = trainer(strategy="ddp", devices=2, max_steps=6, use_distributed_sampler=False, callbacks=[record])
    t.fit(model)
    out = {"rows": record.rows, "bias": [layer.expert_bias.tolist() for layer in model.layers]}
    write_result(out, rank=t.global_rank)


if __name__ == "__main__":
    main(body)
