"""DatagoDataModule under a real Lightning Trainer (CPU)."""

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from datago import DatagoDataset                      # noqa: E402
from datago.lightning import DatagoDataModule          # noqa: E402
from test_dataset import config, make_tree             # noqa: E402


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.seen = {}
        self.val_seen = []

    def training_step(self, batch, _):
        self.seen.setdefault(self.current_epoch, []).extend(batch["id"])
        x = batch["image"].float().mean(dim=(2, 3)) / 255
        return self.lin(x).pow(2).mean()

    def validation_step(self, batch, _):
        self.val_seen.extend(batch["id"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(epochs):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fit_two_epochs_reshuffles_and_covers(tmp_path, num_workers):
    ids = make_tree(tmp_path, n=20)
    train = config(tmp_path, batch_size=4, seed=5)
    train["source_config"]["random_sampling"] = True
    val = config(tmp_path, batch_size=8)
    dm = DatagoDataModule(train, val, num_workers=num_workers, pin_memory=False)
    model = Tiny()
    _trainer(2).fit(model, datamodule=dm)
    assert sorted(model.seen[0]) == ids and sorted(model.seen[1]) == ids
    assert model.seen[0] != model.seen[1]
    # epoch k's order is the dataset's order for set_epoch(k)
    if num_workers == 0:
        for e in (0, 1):
            ds = DatagoDataset(train)
            ds.set_epoch(e)
            assert [i for b in ds for i in b["id"]] == model.seen[e]
    assert sorted(model.val_seen) == sorted(ids * 2)     # validated after each of the 2 epochs


def test_without_validation_config(tmp_path):
    make_tree(tmp_path, n=6)
    dm = DatagoDataModule(config(tmp_path, batch_size=3), num_workers=0, pin_memory=False)
    model = Tiny()
    _trainer(1).fit(model, datamodule=dm)
    assert len(model.seen[0]) == 6


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_workers"):
        DatagoDataModule({}, num_workers=-1)
