"""Fine-tune a Hugging Face MoE language model with lightning-moe: ``from_hf``, ``Trainer(strategy="moe")``, ``to_hf``.

A ``LightningModule`` wraps a transformers causal LM (by default a tiny random Qwen3-MoE, built from a
config, offline; ``--model PATH`` loads a local checkpoint directory instead). ``lmoe.from_hf`` swaps each
sparse MoE block for an :class:`lightning_moe.MoE` on the same weights (logits unchanged), the model is
fine-tuned on the Python documentation text (``pydoc_data.topics``) with ``strategy="moe"`` on 2 CPU
processes (experts split between them), an expert-load heatmap goes to TensorBoard, and at the end
``lmoe.to_hf`` puts the HF blocks back so ``save_pretrained`` writes a checkpoint transformers loads::

    python examples/finetune_hf_moe.py                          # tiny Qwen3-MoE, 2 processes, ~1.5 minutes
    python examples/finetune_hf_moe.py --family mixtral --aux-loss hf
    python examples/finetune_hf_moe.py --model ./my-moe --devices 1 --max-steps 50
    tensorboard --logdir lightning_logs                          # loss curves and the expert-load heatmap

The tiny model reads bytes (vocabulary 256); a ``--model`` directory with a tokenizer reads its tokens.
``--aux-loss hf`` trains with HF's own balancing loss (``router_aux_loss_coef`` x its loss pooled over
layers); the default adds lightning-moe's per-layer loss (see :mod:`lightning_moe.hf`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from _common import ByteWindows, add_trainer_args, make_trainer, pydoc_corpus
from torch.utils.data import DataLoader

import lightning_moe as lmoe


def tiny_config(family: str, vocab_size: int = 256, experts: int = 8):
    """A small random config: 2 layers, width 64, ``experts`` experts of width 64, top-2."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=16, moe_intermediate_size=64, intermediate_size=128,
                                           num_experts=experts, num_experts_per_tok=2, norm_topk_prob=True)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=64, num_local_experts=experts,
                                          num_experts_per_tok=2)
    raise ValueError(f"--family {family!r} must be qwen3_moe or mixtral")


class TokenData(L.LightningDataModule):
    """Windows of ``seq_len + 1`` tokens of a 1-D id tensor; the last ``held_out`` share is held out."""

    def __init__(self, ids, seq_len: int, batch_size: int, held_out: float = 0.1) -> None:
        super().__init__()
        split = int(len(ids) * (1 - held_out))
        self.train_ids, self.val_ids = ids[:split], ids[split:]
        self.seq_len, self.batch_size = seq_len, batch_size

    def train_dataloader(self) -> DataLoader:
        windows = ByteWindows(self.train_ids, self.seq_len, max(1, self.seq_len // 2))
        return DataLoader(windows, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ByteWindows(self.val_ids, self.seq_len, self.seq_len), batch_size=self.batch_size)


class HFCausalLM(lmoe.MoELightningModule):
    """A transformers causal LM whose MoE blocks are lightning-moe layers.

    The base class adds the layers' balancing losses to the loss ``training_step`` returns (with
    ``aux_loss="lightning_moe"``); with ``aux_loss="hf"`` the HF model adds its own when given labels.
    """

    def __init__(self, model, lr: float = 2e-3, warmup: int = 20, aux_loss: str = "lightning_moe") -> None:
        super().__init__()
        self.model = model
        self.report = lmoe.from_hf(model, aux_loss=aux_loss)  # in place; each process converts its own copy
        self.lr, self.warmup = lr, warmup

    def task_loss(self, batch) -> torch.Tensor:
        ids_BS, target_BS = batch
        logits = self.model(input_ids=ids_BS).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), target_BS.flatten())

    def training_step(self, batch, batch_idx):
        ids_BS, target_BS = batch
        window = torch.cat([ids_BS, target_BS[:, -1:]], dim=1)  # the S + 1 tokens; HF shifts the labels itself
        out = self.model(input_ids=window, labels=window)
        self.log("train_loss", out.loss, prog_bar=True)
        return out.loss

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val_loss", self.task_loss(batch), prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / self.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="local transformers checkpoint directory (default: tiny config)")
    group.add_argument("--family", default="qwen3_moe", help="tiny config family: qwen3_moe | mixtral")
    group.add_argument("--num-experts", type=int, default=8)
    group.add_argument("--aux-loss", choices=("lightning_moe", "hf", "none"), default="lightning_moe")
    group.add_argument("--seq-len", type=int, default=128)
    group.add_argument("--batch-size", type=int, default=8, help="per device")
    group.add_argument("--lr", type=float, default=2e-3)
    group.add_argument("--val-every", type=int, default=100)
    group.add_argument("--out", default="finetuned_hf_moe", help="where save_pretrained writes the result")
    add_trainer_args(parser, devices=2, max_steps=300)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_len, args.batch_size, args.max_steps, args.val_every = 32, 4, min(args.max_steps, 3), 3
    return args


def load_model_and_ids(args):
    """The HF model and the corpus as token ids (bytes for the tiny model or a checkpoint without tokenizer)."""
    import transformers

    corpus = pydoc_corpus()[: 20_000 if args.smoke else None]
    if args.model is None:
        return transformers.AutoModelForCausalLM.from_config(tiny_config(args.family, 256, args.num_experts)), \
            torch.frombuffer(bytearray(corpus), dtype=torch.uint8), "bytes"
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None:
        if model.config.vocab_size < 256:
            raise ValueError(f"--model {args.model}: no tokenizer and vocab_size={model.config.vocab_size} < 256; "
                             "add a tokenizer to the directory")
        return model, torch.frombuffer(bytearray(corpus), dtype=torch.uint8), "bytes"
    return model, torch.tensor(tokenizer(corpus.decode("utf-8"))["input_ids"]), "tokens"


def main(argv=None) -> dict:
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True, verbose=False)
    model, ids, unit = load_model_and_ids(args)
    data = TokenData(ids, args.seq_len, args.batch_size)
    module = HFCausalLM(model, lr=args.lr, aux_loss=args.aux_loss)
    callbacks = []
    try:  # the expert-load heatmap (one row per layer, one column per expert) in TensorBoard
        callbacks.append(lmoe.callbacks.ExpertLoadMonitor(every_n_steps=args.val_every))
    except ModuleNotFoundError:  # matplotlib not installed
        pass
    trainer = make_trainer(args, "finetune_hf_moe", val_check_interval=args.val_every, check_val_every_n_epoch=None,
                           callbacks=callbacks, limit_val_batches=2 if args.smoke else 1.0)
    if trainer.is_global_zero:
        print(f"data: pydoc_data.topics, {len(data.train_ids):,} training and {len(data.val_ids):,} held-out {unit}")
        print(module.report)
        print(f"devices={args.devices} strategy={trainer.strategy.__class__.__name__} aux_loss={args.aux_loss}")
    (before,) = trainer.validate(module, datamodule=data, verbose=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    (after,) = trainer.validate(module, datamodule=data, verbose=False)
    result = {"before": before["val_loss"], "after": after["val_loss"], "seconds": seconds,
              "steps": trainer.global_step}
    if not trainer.is_global_zero:
        return result
    print(f"held-out loss before {result['before']:.4f} after {result['after']:.4f} nats/{unit[:-1]} "
          f"({result['steps']} steps in {seconds:.0f} s)")
    # The strategy gathered every expert back at the end of fit: the HF blocks can take the weights.
    module.model.eval()
    probe = next(iter(data.val_dataloader()))[0][:2]
    with torch.no_grad():
        trained = module.model(input_ids=probe).logits
    back = lmoe.to_hf(module.model)
    module.model.save_pretrained(args.out)
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    with torch.no_grad():
        result["reload_difference"] = float((loaded(input_ids=probe).logits - trained).abs().max())
    print(f"to_hf: {len(back.blocks)} block(s) back; save_pretrained -> {Path(args.out).resolve()}; "
          f"from_pretrained logits match (max difference {result['reload_difference']:.2e})")
    result["perplexity_after"] = math.exp(result["after"])
    return result


if __name__ == "__main__":
    main()
