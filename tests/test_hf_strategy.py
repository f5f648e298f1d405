"""A converted Hugging Face Qwen3-MoE trains under Trainer(strategy="moe") on 2 gloo ranks (experts sharded
over both), and its checkpoints -- the full one and a consolidated sharded one -- convert back and load in HF
with the trained model's logits."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("transformers", minversion="5")

from launch import run_rank_script  # noqa: E402

SCRIPT = textwrap.dedent("""
    import json, os, sys, warnings
    warnings.filterwarnings("ignore")
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader
    import transformers
    import lightning_moe as lmoe
    from lightning_moe.strategy import consolidate_checkpoint
    from test_hf import _ids, tiny_model

    OUT = {out!r}

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

    ids = _ids()
    initial = logits(HFLM().model, ids)
    trainer, module = fit("full", "full")
    out = {{"rank": trainer.global_rank}}
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
    with open(os.path.join(OUT, f"rank{{trainer.global_rank}}.json"), "w") as f:
        json.dump(out, f)
""")


@pytest.mark.distributed
@pytest.mark.slow
def test_converted_qwen3_moe_trains_expert_parallel_and_loads_back_in_hf(tmp_path):
    ranks = run_rank_script(tmp_path, "hf_ep.py", SCRIPT, timeout=600)
    result = ranks[0]
    assert result["moved"] > 1e-3  # training changed the model, so the comparisons below can fail
    assert result["w1_shape"] == [4, 16, 16]  # the full checkpoint holds every expert, not rank 0's two
    assert result["full_ckpt"] < 1e-5
    assert result["module"] < 1e-5
    assert result["consolidated"] < 1e-5
