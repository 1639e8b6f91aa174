"""Running a static (PT2E) int8 graph fast on the CPU, compiled by Inductor.

The reference graph that ``convert_pt2e`` returns quantizes and dequantizes around float ops, so it
runs slower than float. Inductor's x86 lowering (with freezing) turns it into real int8 convolutions
and matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InductorGraph(nn.Module):
    """A PT2E graph compiled by Inductor with freezing, which lowers quantize/dequantize pairs around
    conv and linear to oneDNN int8 kernels. One compile per input shape (a dynamic batch dimension
    breaks that lowering in torch 2.14), cached by ``torch.compile``; inference only.

    Args:
        graph: the converted PT2E graph (kept as ``graph``: it is what gets saved).
    """

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph
        self.compiled = torch.compile(graph, dynamic=False)
        self._shapes: set[tuple[int, ...]] = set()  # compiled so far

    def forward(self, x: Tensor) -> Tensor:
        import torch._inductor.config as inductor_config

        with torch.no_grad():
            if tuple(x.shape) in self._shapes:
                return self.compiled(x)
            # Freezing is a global Inductor setting, needed while compiling; entering the patch on
            # every call would cost more than the int8 kernels save.
            try:
                with inductor_config.patch(freezing=True):
                    out = self.compiled(x)
            except Exception as err:  # dynamo and Inductor raise many types
                raise RuntimeError(f"the compiled graph failed: {type(err).__name__}: {err}") from err
            self._shapes.add(tuple(x.shape))
            return out
