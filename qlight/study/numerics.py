"""How training values fare in fp16 and bf16: a callback that samples them during training."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from qlight.errors import QlightError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cast_outcomes(values: Tensor, dtype: torch.dtype) -> dict[str, int]:
    """Count the finite non-zero values of ``values`` that overflow to inf, underflow to zero or land
    on a subnormal when cast to ``dtype``."""
    values = values.detach().float().flatten()
    values = values[torch.isfinite(values) & (values != 0)]
    cast = values.to(dtype)
    tiny = torch.finfo(dtype).tiny
    return {
        "count": values.numel(),
        "overflow": int(torch.isinf(cast).sum()),
        "underflow": int((cast == 0).sum()),
        "subnormal": int(((cast != 0) & (cast.abs() < tiny)).sum()),
    }


class PrecisionStats(Callback):
    """Every ``every_n_steps`` training steps, sample the (unscaled) gradients and the outputs of
    every Conv2d and Linear, and count which values overflow, underflow or turn subnormal when cast
    to fp16 and to bf16. Also follows the AMP GradScaler (16-mixed): skipped steps and scale changes.

    Values that are already half precision (under autocast) are counted as they are: the counts then
    say what the cast lost before the callback saw it. Read the totals from :meth:`summary`; they
    are kept in checkpoints, so a resumed fit goes on counting.

    Args:
        every_n_steps: sampling period in optimizer steps.

    Raises:
        QlightError: when ``every_n_steps`` is below 1.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from torch import nn
        >>> from qlight import CIFAR100DataModule, ImageClassifier
        >>> from qlight.study import PrecisionStats
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(512, 100))
        >>> data = CIFAR100DataModule(
        ...     batch_size=32, synthetic=True, synthetic_train_size=192, synthetic_test_size=64, val_size=64
        ... )
        >>> stats = PrecisionStats(every_n_steps=1)
        >>> trainer = Trainer(max_epochs=1, callbacks=[stats], logger=False, enable_progress_bar=False)
        >>> trainer.fit(ImageClassifier(net), data)
        >>> summary = stats.summary()["values"]
        >>> summary["gradient/fp16"]["count"] > 0, summary["gradient/bf16"]["overflow"]
        (True, 0)
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self._validate(every_n_steps)
        self.every_n_steps = every_n_steps
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self._scale_changes: list[Any] = [0, 0]  # decreases, increases (device tensors once counting)
        self.losses: list[tuple[int, float]] = []  # (step, training loss) at the sampled steps
        self._hooks: list[Any] = []
        self._last_scale: Tensor | None = None

    @staticmethod
    def _validate(every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise QlightError(f"every_n_steps must be at least 1, got {every_n_steps}")

    def _sampling(self, trainer: Trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    def _add(self, kind: str, values: Tensor) -> None:
        for name, dtype in DTYPES.items():
            for key, count in cast_outcomes(values, dtype).items():
                self.counts[f"{kind}/{name}"][key] += count

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        def record(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if module.training and self._sampling(trainer) and torch.is_tensor(output):
                self._add("activation", output)

        self._hooks = [
            m.register_forward_hook(record) for m in pl_module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        ]

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._sampling(trainer):  # Lightning has unscaled AMP gradients by now
            grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
            if grads:
                self._add("gradient", torch.cat(grads))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss) and (trainer.global_step - 1) % self.every_n_steps == 0:
            self.losses.append((trainer.global_step, float(loss)))
        scale = getattr(getattr(trainer.precision_plugin, "scaler", None), "_scale", None)
        if scale is None:  # no GradScaler (bf16, fp32) or not yet initialized
            return
        if self._last_scale is not None:
            # Compared on the device: GradScaler.get_scale() would wait for the GPU every step.
            self._scale_changes[0] += scale < self._last_scale
            self._scale_changes[1] += scale > self._last_scale
        self._last_scale = scale.clone()

    def summary(self) -> dict[str, Any]:
        """``{"values": {"gradient/fp16": {"count", "overflow", ..., "overflow_share", ...}},
        "scaler": {...}, "losses": [[step, loss], ...]}``."""
        values = {}
        for key, counts in sorted(self.counts.items()):
            total = max(counts["count"], 1)
            values[key] = {
                **counts,
                **{f"{k}_share": counts[k] / total for k in ("overflow", "underflow", "subnormal")},
            }
        decreases, increases = (int(n) for n in self._scale_changes)
        scaler = {
            # GradScaler lowers the scale exactly when it skipped a step for inf/NaN gradients.
            "skipped_steps": decreases,
            "scale_decreases": decreases,
            "scale_increases": increases,
            "final_scale": None if self._last_scale is None else float(self._last_scale),
        }
        return {"values": values, "scaler": scaler, "losses": [list(x) for x in self.losses]}

    @override
    def state_dict(self) -> dict[str, Any]:
        decreases, increases = (int(n) for n in self._scale_changes)
        return {
            "counts": {key: dict(counts) for key, counts in self.counts.items()},
            "scale_changes": [decreases, increases],
            "losses": [list(x) for x in self.losses],
            "last_scale": None if self._last_scale is None else float(self._last_scale),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counts = defaultdict(Counter, {key: Counter(c) for key, c in state_dict["counts"].items()})
        self._scale_changes = list(state_dict["scale_changes"])
        self.losses = [tuple(x) for x in state_dict["losses"]]
        last = state_dict["last_scale"]
        self._last_scale = None if last is None else torch.tensor(last)
