"""Lightning DataModule over DatagoDataset (optional: needs ``lightning``).

    dm = DatagoDataModule(train_cfg, val_cfg, num_workers=4)
    trainer.fit(model, datamodule=dm)

Each epoch's shuffle follows ``trainer.current_epoch`` (the loaders call
``set_epoch`` when an epoch starts, persistent workers included), so resuming at
epoch k reproduces epoch k's order.  Batches come from the dataset (one bucket per
batch); the DataLoaders use ``batch_size=None``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from torch.utils.data import DataLoader

from datago.config import DatagoConfig
from datago.dataset import DatagoDataset

try:
    from lightning.pytorch import LightningDataModule
except ImportError:                                         # pragma: no cover - optional
    try:
        from pytorch_lightning import LightningDataModule
    except ImportError:
        raise ImportError(
            "datago.lightning needs Lightning: pip install lightning "
            "(or pytorch-lightning); the rest of datago works without it") from None

__all__ = ["DatagoDataModule", "EpochDataLoader"]

Config = Union[DatagoConfig, dict, str]


class EpochDataLoader(DataLoader):
    """A DataLoader that calls ``dataset.set_epoch(epoch_fn())`` each time an epoch
    starts (``iter(loader)``), before the workers read the epoch, and that knows
    which batches the trainer consumed: its ``state_dict()`` resumes right after
    them (Lightning saves and restores it with its checkpoints)."""

    def __init__(self, dataset: DatagoDataset, epoch_fn: Callable[[], int], **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn = epoch_fn
        self._done: set = set()           # steps consumed in the current epoch, beyond _next
        self._next = 0                    # every step before it was consumed
        self._epoch: Optional[int] = None

    def __iter__(self):
        self.dataset.set_epoch(int(self._epoch_fn()))
        epoch = self.dataset.epoch
        if epoch != self._epoch:
            self._epoch, self._done = epoch, set()
            self._next = self.dataset._start(epoch)
        return self._track(super().__iter__())

    def _track(self, it):
        for batch in it:
            step = batch.get("step") if isinstance(batch, dict) else None
            if step is not None:          # in_order=False can deliver steps out of order
                self._done.add(int(step))
                while self._next in self._done:
                    self._done.discard(self._next)
                    self._next += 1
            yield batch

    def state_dict(self) -> dict:
        epoch = self.dataset.epoch if self._epoch is None else self._epoch
        return self.dataset.state_for(self._next if self._epoch is not None else
                                      self.dataset._start(epoch), epoch)

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._epoch = None


class DatagoDataModule(LightningDataModule):
    """Train (and optional validation) DatagoDatasets as a LightningDataModule."""

    def __init__(self, train_config: Config, val_config: Optional[Config] = None, *,
                 num_workers: int = 2, pin_memory: bool = True,
                 persistent_workers: Optional[bool] = None, prefetch_factor: Optional[int] = None,
                 loader_kwargs: Optional[dict] = None):
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.train_config = train_config
        self.val_config = val_config
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.prefetch_factor = prefetch_factor
        self.loader_kwargs = dict(loader_kwargs or {})   # e.g. {"in_order": False}
        self.train_dataset: Optional[DatagoDataset] = None
        self.val_dataset: Optional[DatagoDataset] = None
        self._epoch = 0

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is None and stage in (None, "fit"):
            self.train_dataset = DatagoDataset(self.train_config)
        if self.val_dataset is None and self.val_config is not None and stage in (None, "fit", "validate"):
            self.val_dataset = DatagoDataset(self.val_config)

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.current_epoch
        self._epoch += 1                 # used without a Trainer: one epoch per iteration
        return self._epoch - 1

    def _loader(self, ds: DatagoDataset, epoch_fn: Callable[[], int]) -> EpochDataLoader:
        kw: dict = dict(num_workers=self.num_workers, pin_memory=self.pin_memory,
                        persistent_workers=self.persistent_workers and self.num_workers > 0)
        if self.prefetch_factor is not None and self.num_workers > 0:
            kw["prefetch_factor"] = self.prefetch_factor
        kw.update(self.loader_kwargs)
        return EpochDataLoader(ds, epoch_fn, **kw)

    def train_dataloader(self) -> EpochDataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, self._current_epoch)

    def val_dataloader(self):
        if self.val_config is None:
            return []
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, lambda: 0)     # same order every time
