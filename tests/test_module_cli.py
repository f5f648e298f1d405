"""MoELightningModule under LightningCLI: hyperparameters from the command line reach the layers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from helpers import RegressionData, TinyMoE  # noqa: E402


@pytest.mark.parametrize("strategy", ["auto", "moe"])
def test_lightning_cli_builds_and_trains_the_configured_model(tmp_path, strategy):
    cli = LightningCLI(
        TinyMoE,
        run=False,
        save_config_callback=None,
        args=[
            "--model.num_experts=8", "--model.top_k=1", "--model.bias_update_rate=0.01",
            "--trainer.accelerator=cpu", "--trainer.devices=1", f"--trainer.strategy={strategy}",
            "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert cli.model.hparams.num_experts == 8 and cli.model.hparams.top_k == 1
    assert [layer.num_experts for _, layer in cli.model.moe_layers()] == [8, 8]
    bias_before = cli.model.layers[0].expert_bias.clone()
    cli.trainer.fit(cli.model, datamodule=RegressionData())
    assert cli.trainer.global_step == 3
    assert not torch.equal(bias_before, cli.model.layers[0].expert_bias)  # balancing ran under the CLI
    ckpt = tmp_path / "cli.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    restored = TinyMoE.load_from_checkpoint(ckpt, weights_only=True)
    assert restored.hparams.num_experts == 8
    torch.testing.assert_close(restored.layers[0].expert_bias, cli.model.layers[0].expert_bias)
