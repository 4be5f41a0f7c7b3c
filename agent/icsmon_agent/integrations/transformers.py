"""Hugging Face ``Trainer``: ``trainer = Trainer(..., callbacks=[IcsmonCallback()])``.

Watches the model when training begins, marks a step at each of the framework's optimizer steps
(``on_step_end``) with the latest logged loss (``logging_steps=1`` for every step's), and closes at
the end. ``stop_on=("nonfinite",)`` stops training cleanly (``control.should_training_stop``) once
the loss or a layer's figures hold NaN/Inf on any rank: the ranks agree, or one would wait for the
others in the next all-reduce.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from . import any_rank, check_stop_on, loss_value, nonfinite


class IcsmonCallback(TrainerCallback):
    def __init__(self, *, stop_on: tuple[str, ...] = (), **watch_kwargs: Any) -> None:
        self.stop_on = check_stop_on(stop_on)
        self.watch_kwargs = watch_kwargs
        self.monitor: Any = None
        self.stopped_at: int | None = None  # the step at which stop_on stopped training
        self._loss: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        import icsmon_agent

        if model is not None and self.monitor is None:
            self.watch_kwargs.setdefault("name", type(model).__name__)
            self.monitor = icsmon_agent.watch(model, **self.watch_kwargs)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            self._loss = loss_value(logs["loss"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        self.monitor.step(loss=self._loss)
        if "nonfinite" in self.stop_on and any_rank(nonfinite(self._loss, self.monitor), kwargs.get("model")):
            self.stopped_at = int(state.global_step)
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
