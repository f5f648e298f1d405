"""Train a small Mixture-of-Experts language model on the Python documentation, with expert parallelism.

Every feed-forward block is an :class:`lightning_moe.MoE` (8 experts, top-2); ``Trainer(strategy="moe",
devices=2)`` puts half the experts in each of two CPU processes and sends tokens between them with all-to-all.
The corpus is the documentation text that ships with CPython (``pydoc_data.topics``), read byte by byte;
the last 10% is held out. Runs offline in about 3 minutes on 2 CPU cores::

    python examples/language_model.py                         # devices=2, strategy="moe", CPU
    python examples/language_model.py --devices 1 --max-steps 600
    python examples/language_model.py --accelerator gpu --devices 4 --precision bf16-mixed
    tensorboard --logdir lightning_logs                       # curves, incl. expert load
"""

from __future__ import annotations

import argparse
import math
import time

import lightning as L
from _common import (
    ByteDataModule,
    LanguageModel,
    LMConfig,
    add_trainer_args,
    count_params,
    make_trainer,
    shrink_language_model_for_smoke,
)

import lightning_moe as lmoe


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--dim", type=int, default=128)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--num-experts", type=int, default=8)
    model.add_argument("--top-k", type=int, default=2)
    model.add_argument("--ffn-hidden", type=int, default=512,
                       help="dense-equivalent feed-forward width; each expert gets ffn_hidden / top_k")
    model.add_argument("--seq-len", type=int, default=128)
    model.add_argument("--batch-size", type=int, default=16, help="per device")
    model.add_argument("--lr", type=float, default=3e-3)
    model.add_argument("--val-every", type=int, default=50, help="held-out evaluation every N steps")
    add_trainer_args(parser, devices=2, max_steps=400)
    args = parser.parse_args(argv)
    if args.smoke:
        shrink_language_model_for_smoke(args)
        args.max_steps, args.val_every = min(args.max_steps, 3), 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True, verbose=False)
    config = LMConfig(seq_len=args.seq_len, dim=args.dim, layers=args.layers, heads=args.heads,
                      ffn_hidden=args.ffn_hidden, num_experts=args.num_experts, top_k=args.top_k)
    data = ByteDataModule(args.seq_len, args.batch_size, max_bytes=20_000 if args.smoke else None)
    model = LanguageModel(config, lr=args.lr)
    callbacks = []
    try:  # a heatmap of tokens per expert per layer in TensorBoard (needs matplotlib)
        callbacks.append(lmoe.callbacks.ExpertLoadMonitor(every_n_steps=args.val_every))
    except ModuleNotFoundError:
        pass
    trainer = make_trainer(args, "language_model", val_check_interval=args.val_every, callbacks=callbacks,
                           check_val_every_n_epoch=None, limit_val_batches=2 if args.smoke else 1.0)
    total, active = count_params(model)
    if trainer.is_global_zero:
        print(f"data: {data.describe()}")
        print(f"model: {total:,} parameters, {active:,} active per token; {args.num_experts} experts top-{args.top_k} "
              f"| devices={args.devices} strategy={trainer.strategy.__class__.__name__} precision={args.precision}")
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    train_time = time.perf_counter() - start
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    result = {"held_out_loss": metrics["val_loss"], "perplexity": math.exp(metrics["val_loss"]),
              "train_seconds": train_time, "steps": trainer.global_step}
    if trainer.is_global_zero:
        print(f"held-out loss {result['held_out_loss']:.4f} nats/byte ({result['held_out_loss'] / math.log(2):.3f} "
              f"bits/byte), perplexity {result['perplexity']:.2f} after {result['steps']} steps "
              f"in {train_time:.0f} s")
    return result


if __name__ == "__main__":
    main()
