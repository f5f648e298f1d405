"""Training runs that lose a rank, for tests/test_reliability.py.

Usage: ``python reliability.py '<json params>'`` (Lightning's popen launcher starts rank 1) or
``torchrun --nproc-per-node 2 reliability.py '<json params>'``. Params:

* ``name``: output subfolder; ``checkpoint``: ``"full"`` or ``"sharded"``; ``ckpt_path``: resume from it;
* ``kill_rank`` and ``kill_step``: that rank SIGKILLs itself in ``training_step`` at that global step, after
  the forward's all-to-all and before backward (mid-epoch: 4 steps an epoch);
* ``kill_in_save``: rank 0 SIGKILLs itself while writing ``last`` at that global step: a full file half
  written by the checkpoint IO, or a DCP directory whose shards are written but not its ``meta.pt``.

Every rank writes ``pid_rank{r}``; the killed one writes ``killed.json`` (time of the kill) first. TinyMoE
with Adam, 4 epochs of 4 steps, each rank its own data; a checkpoint at every epoch end and ``last``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from script_io import env_rank, main, out_dir, write_result  # noqa: E402

EPOCHS = 4


def kill_self() -> None:
    (out_dir() / "killed.json").write_text(json.dumps({"rank": env_rank(), "time": time.time(), "pid": os.getpid()}))
    os.kill(os.getpid(), signal.SIGKILL)


def body() -> None:
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    import lightning_moe as lmoe
    from lightning_moe.distributed.expert_parallel import find_moe_layers, unshard_moe_layer

    from helpers import RegressionData, TinyMoE

    params = json.loads(sys.argv[1])
    folder = out_dir() / params["name"]
    folder.mkdir(parents=True, exist_ok=True)
    (out_dir() / f"pid_rank{env_rank()}").write_text(str(os.getpid()))
    step = {"now": 0}

    class Model(TinyMoE):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            step["now"] = self.global_step
            if self.global_rank == params.get("kill_rank") and self.global_step == params.get("kill_step"):
                kill_self()
            return loss

    class KillingIO(TorchCheckpointIO):
        """Writes half of ``last`` at step ``kill_in_save``, then dies (a kill during a full save)."""

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if "last" in Path(path).name and checkpoint["global_step"] == params.get("kill_in_save"):
                import io

                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                with open(path, "wb") as f:
                    f.write(buffer.getvalue()[: buffer.tell() // 2])
                kill_self()
            super().save_checkpoint(checkpoint, path, storage_options)

    if params["checkpoint"] == "sharded" and params.get("kill_in_save") is not None:
        import torch.distributed.checkpoint as dcp

        dcp_save = dcp.save

        def save_then_die(state, *args, checkpoint_id=None, **kwargs):  # a kill during a sharded save
            result = dcp_save(state, *args, checkpoint_id=checkpoint_id, **kwargs)
            last = "last" in Path(str(checkpoint_id)).name
            if env_rank() == 0 and last and step["now"] + 1 == params["kill_in_save"]:
                kill_self()  # the shards and DCP's .metadata are written, meta.pt is not
            return result

        dcp.save = save_then_die

    torch.manual_seed(0)
    model = Model(num_experts=4, optimizer="adam", lr=0.01)
    checkpoint = ModelCheckpoint(dirpath=folder, filename="epoch{epoch}", save_top_k=-1, save_last=True,
                                 save_on_train_epoch_end=True, auto_insert_metric_name=False)
    strategy = lmoe.MoEStrategy(checkpoint=params["checkpoint"], checkpoint_io=KillingIO())
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=EPOCHS, logger=False,
                        callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)
    data = RegressionData(n=32, batch_size=8, offset=1.5, seed=trainer.global_rank)
    trainer.fit(model, datamodule=data, ckpt_path=params.get("ckpt_path"))
    for _, layer in find_moe_layers(model):  # checkpoint="sharded" leaves the model sharded after fit
        unshard_moe_layer(layer)
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, folder / "final.pt")
    write_result({"global_step": trainer.global_step}, rank=trainer.global_rank)


if __name__ == "__main__":
    main(body)
