"""Calibration batches, what methods derive from the float model once per PTQ run, and forward hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, TypeVar, overload

import torch
from torch import Tensor, nn

T = TypeVar("T")


class Calibration(Sequence[Tensor]):
    """The input batches of one PTQ run, plus a memo of what methods compute from the float model
    (GPTQ's inverse Hessians, the float outputs that bias correction aims at). Every recipe of a run
    quantizes a copy of the same float model, so the first recipe computes these and the others
    reuse them; do not share one ``Calibration`` between different float models.

    Args:
        batches: model inputs, on the device the model runs on.
    """

    def __init__(self, batches: Iterable[Tensor]) -> None:
        self._batches = list(batches)
        self._memo: dict[Hashable, Any] = {}

    @overload
    def __getitem__(self, index: int) -> Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> list[Tensor]: ...

    def __getitem__(self, index: int | slice) -> Tensor | list[Tensor]:
        return self._batches[index]

    def __len__(self) -> int:
        return len(self._batches)


def remembered(calibration: Sequence[Tensor], key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, kept on ``calibration`` under ``key`` when it is a :class:`Calibration` (a plain
    list of batches computes it at every call)."""
    if not isinstance(calibration, Calibration):
        return compute()
    if key not in calibration._memo:
        calibration._memo[key] = compute()
    return calibration._memo[key]


@contextlib.contextmanager
def hooked(model: nn.Module, hooks: dict[str, Callable[..., Any]], pre: bool = False) -> Iterator[None]:
    """Forward hooks (``pre``: forward pre-hooks) on the named submodules of ``model``, removed on exit."""
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(model.get_submodule(name), register)(hook) for name, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run(model: nn.Module, batches: Iterable[Tensor]) -> None:
    """Forward every batch, without gradients (for the hooks' sake)."""
    for batch in batches:
        model(batch)
