"""Lightning: ``Trainer(callbacks=[IcsmonCallback()])`` (``lightning.pytorch`` or ``pytorch_lightning``).

Watches the LightningModule when training starts, marks a step after each optimizer step with the
loss the training step returned, and closes at the end or on an exception. ``stop_on=("nonfinite",)``
(or any rule names) stops training cleanly through ``trainer.should_stop`` once the job's own
judgement says so, decided across ranks as Lightning's own early stopping does.
"""

from __future__ import annotations

from typing import Any

# The class a Trainer accepts is its own package's: `lightning` (lightning.pytorch) where installed,
# else the older `pytorch_lightning`.
try:
    from lightning.pytorch.callbacks import Callback  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,unused-ignore]

from . import check_stop_on


class IcsmonCallback(Callback):  # type: ignore[misc]
    def __init__(self, *, stop_on: tuple[str, ...] = (), **watch_kwargs: Any) -> None:
        super().__init__()
        self.stop_on = tuple(check_stop_on(stop_on))
        self.watch_kwargs = watch_kwargs
        self.monitor: Any = None
        self.stopped_at: int | None = None
        self._seen_step = -1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        import icsmon_agent

        if self.monitor is None:
            self.watch_kwargs.setdefault("name", type(pl_module).__name__)
            self.monitor = icsmon_agent.watch(pl_module, stop_on=self.stop_on, **self.watch_kwargs)
        self._seen_step = trainer.global_step  # the first micro-batch of accumulation is no step yet

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # The training step is the forward (it may call the layers without the module's forward):
        # a micro-batch of accumulation is a forward of the same step, not new layers.
        if self.monitor is not None:
            self.monitor.begin_batch()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.monitor is not None:
            self.monitor.end_batch(loss)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None or trainer.global_step == self._seen_step:
            return  # a micro-batch of gradient accumulation: no optimizer step happened
        self._seen_step = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        accumulated = getattr(trainer, "accumulate_grad_batches", 1)
        if loss is not None and accumulated > 1 and getattr(pl_module, "automatic_optimization", True):
            loss = loss * accumulated  # Lightning hands it divided for accumulation: the user's own
        self.monitor.step(loss=loss)
        if self.stop_on and trainer.strategy.reduce_boolean_decision(self.monitor.should_stop, all=False):
            self.stopped_at = int(trainer.global_step)
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
