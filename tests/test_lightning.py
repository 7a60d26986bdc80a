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


def epoch_ids(cfg, epoch):
    ds = DatagoDataset(cfg)
    ds.set_epoch(epoch)
    return [i for b in ds for i in b["id"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fit_two_epochs_reshuffles_and_covers(tmp_path, num_workers):
    ids = make_tree(tmp_path, n=20)
    train = config(tmp_path, batch_size=4, seed=5)
    train["source_config"]["random_sampling"] = True
    val = config(tmp_path, batch_size=8)
    dm = DatagoDataModule(train, val, num_workers=num_workers, pin_memory=False)
    model = Tiny()
    _trainer(2).fit(model, datamodule=dm)
    assert set(model.seen[0]) == set(ids) and set(model.seen[1]) == set(ids)
    assert model.seen[0] != model.seen[1]
    # epoch k's batches are the dataset's plan for set_epoch(k), in step order (the
    # workers' round robin matches the plan)
    for e in (0, 1):
        assert epoch_ids(train, e) == model.seen[e]
    assert sorted(model.val_seen) == sorted(epoch_ids(val, 0) * 2)   # after each of 2 epochs


def test_without_validation_config(tmp_path):
    make_tree(tmp_path, n=6)
    cfg = config(tmp_path, batch_size=3)
    dm = DatagoDataModule(cfg, num_workers=0, pin_memory=False)
    model = Tiny()
    _trainer(1).fit(model, datamodule=dm)
    assert model.seen[0] == epoch_ids(cfg, 0)
    assert len(model.seen[0]) == 6 + dm.train_dataset.stats()["padded"]


class Interrupt(Exception):
    pass


class StopAt(Tiny):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def training_step(self, batch, i):
        if self.current_epoch == 1 and i == self.at:
            raise Interrupt()
        return super().training_step(batch, i)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_checkpoint_mid_epoch_resumes_exactly(tmp_path, num_workers):
    """A checkpoint taken mid-epoch resumes at the next batch of that epoch."""
    data = tmp_path / "data"
    make_tree(data, n=30)
    train = config(data, batch_size=3, seed=2)
    train["source_config"]["random_sampling"] = True
    ckpt = tmp_path / "ckpt"
    cb = pl.callbacks.ModelCheckpoint(dirpath=ckpt, every_n_train_steps=1, save_top_k=-1,
                                      save_last=True)
    model = StopAt(at=4)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    dm = DatagoDataModule(train, num_workers=num_workers, pin_memory=False)
    with pytest.raises(Interrupt):
        trainer.fit(model, datamodule=dm)
    assert len(model.seen[1]) == 4 * 3                   # epoch 1: batches 0..3 done
    resumed = Tiny()
    dm2 = DatagoDataModule(train, num_workers=num_workers, pin_memory=False)
    pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0).fit(resumed, datamodule=dm2,
                                           ckpt_path=str(ckpt / "last.ckpt"))
    assert model.seen[1] + resumed.seen[1] == epoch_ids(train, 1)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_workers"):
        DatagoDataModule({}, num_workers=-1)
