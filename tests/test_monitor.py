"""ExpertLoadMonitor: accumulated counts, PNG / TensorBoard / log_image outputs, missing matplotlib."""

from __future__ import annotations

import copy
import sys

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import nn

from lightning_moe import MoE
from lightning_moe.callbacks import ExpertLoadMonitor

from helpers import RegressionData, make_trainer


class Plain(L.LightningModule):
    """A plain LightningModule with two MoE layers (one with capacity, so some tokens drop)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([MoE(8, 4, top_k=2, hidden_dim=8),
                                     MoE(8, 6, top_k=1, hidden_dim=8, capacity_factor=0.5)])
        self.head = nn.Linear(8, 1)
        self.seen = []  # per training forward: [(tokens_per_expert, dropped, assignments)] per layer

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        if self.training:
            self.seen.append([(b.tokens_per_expert.clone(), int(b.dropped_tokens), int(b.routed_tokens) * b.top_k)
                              for b in self.blocks])
        return self.head(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(model, callbacks, logger=False, **kwargs) -> L.Trainer:
    trainer = make_trainer(**{"max_steps": 4, **kwargs}, logger=logger, callbacks=callbacks)
    trainer.fit(model, datamodule=RegressionData(n=64, offset=1.5))
    return trainer


class Recording(ExpertLoadMonitor):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.renders = []

    def render(self, names, counts, dropped_share, step):
        image = super().render(names, counts, dropped_share, step)
        self.renders.append((step, names, [c.clone() for c in counts], dropped_share.clone(), image.shape))
        return image


def test_counts_accumulate_between_renders_with_gradient_accumulation(tmp_path):
    torch.manual_seed(1)
    model = Plain()
    monitor = Recording(every_n_steps=1, figsize=(5, 2.5), dpi=40)
    fit(model, [monitor], max_steps=2, accumulate_grad_batches=2, default_root_dir=tmp_path)
    assert [r[0] for r in monitor.renders] == [1, 2]
    for k, (_, names, counts, dropped_share, shape) in enumerate(monitor.renders):
        window = model.seen[2 * k: 2 * k + 2]  # the two micro-batches of optimizer step k
        assert names == ["blocks.0", "blocks.1"]
        for i in range(2):
            assert torch.equal(counts[i], window[0][i][0] + window[1][i][0])
            dropped = window[0][i][1] + window[1][i][1]
            assert dropped_share[i].item() == pytest.approx(dropped / (window[0][i][2] + window[1][i][2]))
        assert dropped_share[1] > 0 and dropped_share[0] == 0
        assert shape == (100, 200, 3)
    assert monitor.last_png.endswith("step_0000002.png")  # no logger: PNGs in default_root_dir
    copy.deepcopy(monitor)  # holds no loss graphs


def test_png_in_csv_log_dir_has_the_right_dimensions(tmp_path):
    import matplotlib.image

    torch.manual_seed(2)
    logger = CSVLogger(tmp_path)
    monitor = ExpertLoadMonitor(every_n_steps=3, figsize=(6, 3), dpi=50)
    fit(Plain(), [monitor], logger=logger, max_steps=4)
    folder = tmp_path / "lightning_logs" / "version_0" / "expert_load"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["step_0000003.png", "step_0000004.png"]  # every 3 steps, and the rest at the end
    for name in names:
        assert (folder / name).stat().st_size > 0
        image = matplotlib.image.imread(folder / name)
        assert image.shape[:2] == (150, 300)
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_tensorboard_gets_the_image_and_no_png(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(3)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(Plain(), [ExpertLoadMonitor(every_n_steps=2, figsize=(4, 2), dpi=50)], logger=logger, max_steps=2)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "moe/expert_load" in events.Tags()["images"]
    (image,) = events.Images("moe/expert_load")
    assert (image.step, image.width, image.height) == (2, 200, 100)
    assert not (tmp_path / "tb" / "version_0" / "expert_load").exists()


class ImageLogger(Logger):
    def __init__(self):
        super().__init__()
        self.images = []

    @property
    def name(self):
        return "images"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, step, [im.shape for im in images]))


def test_loggers_with_log_image_get_it(tmp_path):
    torch.manual_seed(4)
    logger = ImageLogger()
    monitor = ExpertLoadMonitor(every_n_steps=2, tag="load", figsize=(4, 2), dpi=25)
    fit(Plain(), [monitor], logger=logger, max_steps=2, default_root_dir=tmp_path)
    assert logger.images == [("load", 2, [(50, 100, 3)])]
    assert monitor.last_png is None


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-moe\[examples\]'"):
        ExpertLoadMonitor()


@pytest.mark.parametrize("kwargs", [{"every_n_steps": 0}, {"dpi": -1}, {"figsize": (3, 0)}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ExpertLoadMonitor(**kwargs)
