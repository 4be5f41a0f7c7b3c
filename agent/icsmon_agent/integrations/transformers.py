"""Hugging Face ``Trainer``: ``trainer = Trainer(..., callbacks=[IcsmonCallback()])``.

Watches the model when training begins, marks a step at each of the framework's optimizer steps
(``on_step_end``) and closes at the end. The loss is the model's own (its output's ``loss`` tensor,
on sampled steps), never the logged one: the Trainer's ``logging_nan_inf_filter`` turns a NaN
window into a finite number. With ``stop_on=("nonfinite",)`` the weights are looked at after each
optimizer step (one pass, no host sync), which no NaN gets past. ``stop_on=("nonfinite",)`` (or any rule names) stops training cleanly
(``control.should_training_stop``) once the job's own judgement says so on any rank: the ranks
agree, or one would wait for the others in the next all-reduce.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from . import any_rank, check_stop_on


class IcsmonCallback(TrainerCallback):
    def __init__(self, *, stop_on: tuple[str, ...] = (), **watch_kwargs: Any) -> None:
        self.stop_on = tuple(check_stop_on(stop_on))
        self.watch_kwargs = watch_kwargs
        self.monitor: Any = None
        self.stopped_at: int | None = None  # the step at which stop_on stopped training

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        import icsmon_agent

        if model is not None and self.monitor is None:
            self.watch_kwargs.setdefault("name", type(model).__name__)
            self.monitor = icsmon_agent.watch(model, stop_on=self.stop_on, **self.watch_kwargs)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The Trainer hands its callbacks no loss, and the model's own is seen only on sampled
        # steps: a NaN reaches the weights in this very step, so they are looked at, when asked.
        if self.monitor is not None and "nonfinite" in self.stop_on:
            self.monitor.check_parameters()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        self.monitor.step()
        if self.stop_on and any_rank(self.monitor.should_stop, kwargs.get("model")):
            self.stopped_at = int(state.global_step)
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
