"""A padded-sequence MoE model, its data and a single-process reference loop for the loss-scope tests.

``tests/scripts/balance_train.py`` trains :class:`BalanceModel` on N ranks with ``MoEStrategy``;
``tests/test_balance.py`` compares the result with :func:`reference_train`, plain PyTorch on the same global
(micro-)batches in one process: task loss + every layer's ``aux_loss`` (default coefficients), AdamW with a large
``eps``, and bias balancing from the step's counts, summed over its micro-batches.

Padding depends on the position in the global batch: its first half holds short sequences (0-2 routed tokens of
``SEQ``, fully padded ones included) and its second half long ones (3-4), so ranks see very different amounts of
padding (rank 0 mostly padding at 2 and 4 ranks).

Shape legend: B sequences, S tokens per sequence, D model width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_moe as lmoe

DIM, EXPERTS, SEQ, GLOBAL_BATCH, STEPS, LR = 8, 4, 4, 8, 5, 0.02


def make_batches(steps: int, padding: bool, seed: int = 11) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` global batches, concatenated: ``x [steps * B, S, D]``, ``padding_mask [steps * B, S]`` (True =
    padding; all False without ``padding``), ``y [steps * B, 1]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * GLOBAL_BATCH, SEQ, DIM, generator=g)
    y = torch.randn(steps * GLOBAL_BATCH, 1, generator=g)
    mask = torch.zeros(steps * GLOBAL_BATCH, SEQ, dtype=torch.bool)
    if padding:
        for row in range(steps * GLOBAL_BATCH):
            step, b = divmod(row, GLOBAL_BATCH)
            length = (b + step) % 3 if b < GLOBAL_BATCH // 2 else 3 + (b + step) % 2
            mask[row, length:] = True
    return x, mask, y


class Net(nn.Module):
    """Linear -> MoE (stacked experts) -> MoE (template experts) -> masked mean over the sequence -> head."""

    def __init__(self, scope: str = "global", bias_update_rate: float = 0.0) -> None:
        super().__init__()
        moe = dict(top_k=2, hidden_dim=16, bias_update_rate=bias_update_rate, aux_loss_scope=scope)  # default coefs
        self.inp = nn.Linear(DIM, DIM)
        self.moe1 = lmoe.MoE(DIM, EXPERTS, **moe)
        self.moe2 = lmoe.MoE(DIM, EXPERTS, expert=nn.Sequential(nn.Linear(DIM, 16), nn.GELU(), nn.Linear(16, DIM)),
                             **moe)
        self.head = nn.Linear(DIM, 1)

    def forward(self, x_BSD: Tensor, padding_BS: Tensor) -> Tensor:
        h_BSD = torch.tanh(self.inp(x_BSD))
        h_BSD = h_BSD + self.moe1(h_BSD, padding_mask=padding_BS)
        h_BSD = h_BSD + self.moe2(h_BSD, padding_mask=padding_BS)
        keep_BS1 = (~padding_BS)[..., None].to(h_BSD.dtype)
        pooled_BD = (h_BSD * keep_BS1).sum(dim=1) / keep_BS1.sum(dim=1).clamp_min(1)
        return self.head(pooled_BD)

    def layers(self) -> list[lmoe.MoE]:
        return [self.moe1, self.moe2]


class BalanceModel(lmoe.MoELightningModule):
    """:class:`Net` under MoELightningModule (it adds the aux losses and balances the bias); each rank reads its
    contiguous slice of every global micro-batch."""

    def __init__(self, scope: str = "global", padding: bool = False, bias_update_rate: float = 0.0,
                 steps: int = STEPS, accumulate: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = Net(scope, bias_update_rate)

    def training_step(self, batch, batch_idx):
        x, mask, y = batch
        return nn.functional.mse_loss(self.net(x, mask), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR, eps=1e-3)

    def train_dataloader(self):
        acc, steps = self.hparams.accumulate, self.hparams.steps
        x, mask, y = make_batches(steps * acc, self.hparams.padding)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        per = GLOBAL_BATCH // world
        idx = torch.cat([torch.arange(m * GLOBAL_BATCH + rank * per, m * GLOBAL_BATCH + (rank + 1) * per)
                         for m in range(steps * acc)])
        return DataLoader(TensorDataset(x[idx], mask[idx], y[idx]), batch_size=per, shuffle=False)


def reference_train(scope: str = "global", padding: bool = False, bias_update_rate: float = 0.0, steps: int = STEPS,
                    accumulate: int = 1) -> Net:
    """One process, plain PyTorch, on the global micro-batches: what N-rank training must reproduce."""
    torch.manual_seed(0)
    net = Net(scope, bias_update_rate)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, eps=1e-3)
    x, mask, y = make_batches(steps * accumulate, padding)
    for step in range(steps):
        opt.zero_grad()
        load = [torch.zeros(EXPERTS, dtype=torch.long) for _ in net.layers()]
        for m in range(accumulate):
            rows = slice((step * accumulate + m) * GLOBAL_BATCH, (step * accumulate + m + 1) * GLOBAL_BATCH)
            task = nn.functional.mse_loss(net(x[rows], mask[rows]), y[rows])
            loss = (task + sum(layer.aux_loss for layer in net.layers())) / accumulate
            loss.backward()
            load = [total + layer.tokens_per_expert for total, layer in zip(load, net.layers(), strict=True)]
        opt.step()
        if bias_update_rate > 0:
            for layer, counts in zip(net.layers(), load, strict=True):
                layer.update_expert_bias(counts)
    return net
