"""Image classification with a small Vision Transformer whose MLPs are Mixture-of-Experts layers (V-MoE style),
data augmentation, optional FGSM / PGD adversarial training, and test accuracy per epoch.

Data: ``--dataset synthetic`` (default, offline): generated 32x32 RGB images of ten shape and texture classes
(disc, square, triangle, plus, ring, horizontal / vertical / diagonal stripes, checkerboard, X) with random
position, size, colours and pixel noise. ``--dataset cifar10``: CIFAR-10 through torchvision (downloaded to
``--data-dir``; needs ``pip install torchvision`` and internet the first time).

Augmentation: random crop (4-pixel zero padding) and horizontal flip on the training set; per-channel
normalisation is the model's first layer, so attacks work in [0, 1] pixel space::

    python examples/image_classification.py                        # synthetic data, ~2 minutes on CPU
    python examples/image_classification.py --adversarial fgsm     # FGSM adversarial training (~2x slower)
    python examples/image_classification.py --adversarial pgd      # 3-step PGD training (~4x slower)
    python examples/image_classification.py --dataset cifar10 --accelerator gpu --devices 2 --epochs 30
"""

from __future__ import annotations

import argparse
import math

import lightning as L
import torch
import torch.nn.functional as F
from _common import add_trainer_args, make_trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_moe as lmoe

SYNTHETIC_CLASSES = ("disc", "square", "triangle", "plus", "ring", "h-stripes", "v-stripes", "diagonal-stripes",
                     "checkerboard", "x")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------------------------------
# Data


def synthetic_shapes(n: int, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` images ``[n, 3, size, size]`` in [0, 1] and labels ``[n]`` of the ten :data:`SYNTHETIC_CLASSES`."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SYNTHETIC_CLASSES), (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")

    def uniform(lo, hi):
        return (lo + (hi - lo) * torch.rand(n, generator=g))[:, None, None]

    r = uniform(size * 0.18, size * 0.32)
    cx, cy = uniform(size * 0.35, size * 0.65), uniform(size * 0.35, size * 0.65)
    dx, dy = xx - cx, yy - cy
    dist = (dx**2 + dy**2).sqrt()
    period, phase = uniform(4.0, 8.0), uniform(0.0, 2 * math.pi)
    slope = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)[:, None, None]
    thick = r / 4
    masks = [
        dist <= r,                                                                 # disc
        torch.maximum(dx.abs(), dy.abs()) <= r * 0.8,                              # square
        (dy.abs() <= r * 0.8) & (dx.abs() <= (dy + r * 0.8) / 2),                  # triangle
        ((dx.abs() <= thick) & (dy.abs() <= r)) | ((dy.abs() <= thick) & (dx.abs() <= r)),  # plus
        (dist <= r) & (dist >= r * 0.55),                                          # ring
        torch.sin(2 * math.pi * yy / period + phase) > 0,                          # horizontal stripes
        torch.sin(2 * math.pi * xx / period + phase) > 0,                          # vertical stripes
        torch.sin(2 * math.pi * (xx + slope * yy) / period + phase) > 0,           # diagonal stripes
        torch.sin(math.pi * xx / period * 2 + phase) * torch.sin(math.pi * yy / period * 2) > 0,  # checkerboard
        (((dx - dy).abs() <= thick) | ((dx + dy).abs() <= thick)) & (torch.maximum(dx.abs(), dy.abs()) <= r),  # x
    ]
    mask = torch.stack(masks)[labels, torch.arange(n)].float()[:, None]          # [n, 1, H, W]
    foreground = torch.rand(n, 3, 1, 1, generator=g)
    background = (foreground + 0.35 + 0.3 * torch.rand(n, 3, 1, 1, generator=g)) % 1.0
    images = background + (foreground - background) * mask
    images = images + 0.12 * torch.randn(images.shape, generator=g)
    return images.clamp(0, 1), labels


class Augmented(Dataset):
    """Random crop with zero padding and random horizontal flip, on ``[3, H, W]`` tensors in [0, 1]."""

    def __init__(self, images: Tensor, labels: Tensor, padding: int = 4) -> None:
        self.images, self.labels, self.padding = images, labels, padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        size = image.shape[-1]
        padded = F.pad(image, [self.padding] * 4)
        top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        image = padded[:, top: top + size, left: left + size]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]


class ImageData(L.LightningDataModule):
    def __init__(self, dataset: str, batch_size: int, num_train: int, num_test: int, data_dir: str,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.data_dir, self.num_workers = dataset, batch_size, data_dir, num_workers
        if dataset == "cifar10":
            self.classes, self.mean, self.std = None, CIFAR10_MEAN, CIFAR10_STD
        else:
            images, labels = synthetic_shapes(num_train + num_test, seed=1234)
            self.train_set = Augmented(images[:num_train], labels[:num_train])
            self.test_set = TensorDataset(images[num_train:], labels[num_train:])
            self.classes = SYNTHETIC_CLASSES
            self.mean = tuple(images[:num_train].mean(dim=(0, 2, 3)).tolist())
            self.std = tuple(images[:num_train].std(dim=(0, 2, 3)).tolist())

    def describe(self) -> str:
        if self.dataset == "cifar10":
            return f"CIFAR-10 (torchvision, {self.data_dir})"
        return (f"synthetic shapes (generated offline): {len(self.train_set)} training / {len(self.test_set)} "
                f"test images, 32x32 RGB, classes {', '.join(self.classes)}")

    def prepare_data(self) -> None:
        if self.dataset == "cifar10":
            datasets, _ = _torchvision()
            datasets.CIFAR10(self.data_dir, train=True, download=True)
            datasets.CIFAR10(self.data_dir, train=False, download=True)

    def setup(self, stage: str) -> None:
        if self.dataset == "cifar10":
            datasets, transforms = _torchvision()
            train = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor()])
            self.train_set = datasets.CIFAR10(self.data_dir, train=True, transform=train)
            self.test_set = datasets.CIFAR10(self.data_dir, train=False, transform=transforms.ToTensor())
            self.classes = tuple(self.train_set.classes)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=2 * self.batch_size, num_workers=self.num_workers)


def _torchvision():
    try:
        from torchvision import datasets, transforms
    except ModuleNotFoundError as err:
        raise SystemExit("--dataset cifar10 needs torchvision: pip install torchvision "
                         "(or use the default --dataset synthetic)") from err
    return datasets, transforms


# --------------------------------------------------------------------------------------------------
# Model: a small ViT with MoE MLPs in every other block (V-MoE, Riquelme et al. 2021)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x_BSD: Tensor) -> Tensor:
        b, s, d = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: nn.Module) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim), mlp

    def forward(self, x_BSD: Tensor) -> Tensor:
        x_BSD = x_BSD + self.attn(self.ln1(x_BSD))
        return x_BSD + self.mlp(self.ln2(x_BSD))


class MoEViT(nn.Module):
    """Patch embedding -> blocks (odd ones with an MoE MLP) -> mean pool -> linear head."""

    def __init__(self, mean, std, num_classes: int = 10, image_size: int = 32, patch: int = 4, dim: int = 96,
                 depth: int = 4, heads: int = 4, num_experts: int = 8, top_k: int = 2, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn((image_size // patch) ** 2, dim) * 0.02)
        blocks = []
        for i in range(depth):
            if i % 2 == 1 and num_experts > 0:
                mlp: nn.Module = lmoe.MoE(dim, num_experts, top_k, hidden_dim=mlp_ratio * dim, activation="gelu")
            else:
                mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
            blocks.append(ViTBlock(dim, heads, mlp))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, pixels_BCHW: Tensor) -> Tensor:
        x = self.patch((pixels_BCHW - self.mean) / self.std)   # normalisation inside: attacks see [0, 1] pixels
        x_BSD = x.flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x_BSD = block(x_BSD)
        return self.head(self.norm(x_BSD.mean(dim=1)))


# --------------------------------------------------------------------------------------------------
# Attacks


def pgd(model: nn.Module, images: Tensor, labels: Tensor, epsilon: float, steps: int, alpha: float | None = None,
        random_start: bool = True) -> Tensor:
    """L-infinity PGD (Madry et al. 2018); ``steps=1`` with ``alpha=1.25 * epsilon`` is fast FGSM with a random
    start (Wong et al. 2020). Returns adversarial images in [0, 1], detached."""
    alpha = alpha if alpha is not None else 2.5 * epsilon / steps
    delta = torch.empty_like(images).uniform_(-epsilon, epsilon) if random_start else torch.zeros_like(images)
    delta = ((images + delta).clamp(0, 1) - images).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(images + delta), labels)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta + alpha * grad.sign()).clamp(-epsilon, epsilon)
        delta = ((images + delta).clamp(0, 1) - images).detach()
    return (images + delta).detach()


class ImageClassifier(lmoe.MoELightningModule):
    """Cross-entropy classifier; with ``adversarial`` it trains on FGSM or PGD examples and reports test
    accuracy on clean and PGD-attacked images."""

    def __init__(self, mean, std, num_classes: int = 10, dim: int = 96, depth: int = 4, num_experts: int = 8,
                 top_k: int = 2, lr: float = 2e-3, adversarial: str = "none",
                 epsilon: float = 4 / 255, pgd_steps: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = MoEViT(mean, std, num_classes, dim=dim, depth=depth, num_experts=num_experts, top_k=top_k)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model(pixels)

    def _attack(self, images: Tensor, labels: Tensor, steps: int) -> Tensor:
        hp = self.hparams
        alpha = 1.25 * hp.epsilon if steps == 1 else None
        return pgd(self.model, images, labels, hp.epsilon, steps, alpha)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.hparams.adversarial != "none":
            images = self._attack(images, labels, 1 if self.hparams.adversarial == "fgsm" else self.hparams.pgd_steps)
        logits = self(images)  # the last forward: the MoE layers' aux losses are this one's
        loss = F.cross_entropy(logits, labels)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", (logits.argmax(-1) == labels).float().mean(), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        n = images.shape[0]
        self.log("test_acc", (self(images).argmax(-1) == labels).float().mean(), prog_bar=True, sync_dist=True,
                 batch_size=n)
        if self.hparams.adversarial != "none":
            attacked = self._attack(images, labels, self.hparams.pgd_steps)
            self.log("test_acc_pgd", (self(attacked).argmax(-1) == labels).float().mean(), prog_bar=True,
                     sync_dist=True, batch_size=n)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
        steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, self.hparams.lr, total_steps=max(2, int(steps)),
                                                        pct_start=0.15)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class EpochTable(L.Callback):
    """Collects the test accuracy after every epoch and prints the table at the end."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch + 1}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test_acc")})
        self.rows.append(row)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        print("\nepoch | " + " | ".join(k for k in self.rows[0] if k != "epoch") if self.rows else "")
        for row in self.rows:
            print(f"{row['epoch']:>5} | " + " | ".join(f"{v:.3f}" for k, v in row.items() if k != "epoch"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("synthetic", "cifar10"), default="synthetic")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--num-train", type=int, default=6000, help="synthetic training images")
    parser.add_argument("--num-test", type=int, default=1000, help="synthetic test images")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--adversarial", nargs="?", const="pgd", default="none", choices=("none", "fgsm", "pgd"),
                        help="adversarial training; bare --adversarial means pgd")
    parser.add_argument("--epsilon", type=float, default=4 / 255, help="L-inf attack radius in [0, 1] pixels")
    parser.add_argument("--pgd-steps", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=0)
    add_trainer_args(parser, devices=1, max_steps=-1)
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_train, args.num_test, args.batch_size, args.dim, args.depth = 32, 16, 16, 32, 2
        args.epochs, args.pgd_steps = 1, 1
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True, verbose=False)
    data = ImageData(args.dataset, args.batch_size, args.num_train, args.num_test, args.data_dir, args.num_workers)
    model = ImageClassifier(data.mean, data.std, dim=args.dim, depth=args.depth, num_experts=args.num_experts,
                            top_k=args.top_k, lr=args.lr, adversarial=args.adversarial,
                            epsilon=args.epsilon, pgd_steps=args.pgd_steps)
    table = EpochTable()
    # Attacks need gradients during validation: no inference mode then.
    trainer = make_trainer(args, "image_classification", max_epochs=args.epochs, callbacks=[table],
                           inference_mode=args.adversarial == "none")
    if trainer.is_global_zero:
        print(f"data: {data.describe()}")
        print(f"adversarial training: {args.adversarial}"
              + (f" (epsilon {args.epsilon:.4f}, {args.pgd_steps} PGD steps)" if args.adversarial != "none" else ""))
    trainer.fit(model, datamodule=data)
    return table.rows


if __name__ == "__main__":
    main()
