"""A converted Hugging Face Qwen3-MoE trained with ``strategy="moe"`` (ep=2), for tests/test_hf_strategy.py.

Usage: ``python hf_qwen3_ep.py`` (Lightning's popen launcher starts the other rank). Fits with a full and then
a sharded checkpoint; rank 0 converts the trained module, the full checkpoint and the consolidated sharded one
back to HF, loads them with ``transformers`` and writes the largest logit differences to ``rank0.json``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

torch.set_num_threads(1)

import lightning.pytorch as pl  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_moe as lmoe  # noqa: E402
from lightning_moe.strategy import consolidate_checkpoint  # noqa: E402

from script_io import main, out_dir, write_result  # noqa: E402
from test_hf import _ids, tiny_model  # noqa: E402

OUT = str(out_dir())


class HFLM(lmoe.MoELightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_model("qwen3_moe_norm", num_experts=4)
        self.report = lmoe.from_hf(self.model)

    def training_step(self, ids, batch_idx):
        return self.model(ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2)


def loader():
    data = torch.randint(3, 64, (16, 12), generator=torch.Generator().manual_seed(7))
    return DataLoader(data, batch_size=2)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def fit(name, checkpoint):
    module = HFLM()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(OUT, name), save_last=True)
    strategy = lmoe.MoEStrategy(expert_parallel_size=2, checkpoint=checkpoint)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=4, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt])
    trainer.fit(module, loader())
    return trainer, module


def back_to_hf(state_dict, name):
    fresh = HFLM()  # same seed, converted: the structure the checkpoint's names refer to
    fresh.load_state_dict(state_dict)
    lmoe.to_hf(fresh.model)
    fresh.model.save_pretrained(os.path.join(OUT, name))
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.join(OUT, name))


def body() -> None:
    ids = _ids()
    initial = logits(HFLM().model, ids)
    trainer, module = fit("full", "full")
    out = {"rank": trainer.global_rank}
    if trainer.global_rank == 0:
        trained = logits(module.model, ids)
        out["moved"] = float((trained - initial).abs().max())
        state = torch.load(os.path.join(OUT, "full", "last.ckpt"), weights_only=False)["state_dict"]
        out["w1_shape"] = list(state["model.model.layers.0.mlp.moe.experts.w1"].shape)
        out["full_ckpt"] = float((logits(back_to_hf(state, "hf_full"), ids) - trained).abs().max())
        lmoe.to_hf(module.model)  # the trained module itself, experts gathered back by the strategy
        module.model.save_pretrained(os.path.join(OUT, "hf_module"))
        loaded = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(OUT, "hf_module"))
        out["module"] = float((logits(loaded, ids) - trained).abs().max())

    trainer, module = fit("sharded", "sharded")
    trained = logits(module.model, ids)  # still sharded after fit: every rank takes part in the forward
    if trainer.global_rank == 0:
        state = consolidate_checkpoint(os.path.join(OUT, "sharded", "last.ckpt"))["state_dict"]
        out["consolidated"] = float((logits(back_to_hf(state, "hf_sharded"), ids) - trained).abs().max())
    write_result(out, rank=trainer.global_rank)


if __name__ == "__main__":
    main(body)
