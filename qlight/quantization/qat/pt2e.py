"""Quantization-aware training on a torchao PT2E graph: prepare, switch phases, synchronise, convert.

torchao's flow is ``prepare_qat_pt2e`` on an exported training graph, training, then ``convert_pt2e``.
Run inside Lightning, and converted so that the int8 graph computes what training evaluated, it needs
the fixes below (torch 2.14, torchao 0.18, Lightning 2.6), each in the function named:

- :func:`set_phase`: an exported graph has no train/eval mode; its batch_norm and dropout nodes carry
  a ``training`` literal, ``num_batches_tracked += 1`` runs in every forward, and a fused fake-quant
  observes whenever its observer is on, in eval too. torchao's ``move_exported_model_to_eval`` rewrites
  the graph by pattern matching (about 0.5 s, and it resets dropout's ``p`` to 0.5).
- :func:`prepare`: ``prepare_qat_pt2e`` rewrites a BatchNorm's momentum and eps to its pattern's 0.1
  and 1e-5; a one-image example cannot be exported with a dynamic batch dimension; deep copies of a
  ``GraphModule`` keep no instance attributes, so ``train``/``eval`` are kept through ``meta``.
- :func:`convert`: ``convert_pt2e`` folds BatchNorm with eps 1e-5 whatever the layer's, and takes
  the weight scales from the observers' formula instead of those the fused fake-quant trained with.
- both: torchao exports its conv-bn pattern graphs for every kind of conv, present or not (slow).
- :func:`sync_observers`: under DDP each rank updates its own observers and BatchNorm statistics.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY, GraphModule
from torch.nn import functional as F
from torchao.quantization.pt2e import FakeQuantizeBase

from qlight.errors import QlightError
from qlight.quantization.recipes.static import export_batched, tidy_converted

aten = torch.ops.aten
# The index of the ``training`` argument of the ops an exported training graph holds.
_BATCH_NORM = {aten.batch_norm.default: 5, aten._native_batch_norm_legit.default: 5, aten.cudnn_batch_norm.default: 5}
_DROPOUT = {aten.dropout.default: 2}
_CONVS = {
    F.conv1d: aten.conv1d.default,
    F.conv2d: aten.conv2d.default,
    F.conv_transpose1d: aten.conv_transpose1d.default,
    F.conv_transpose2d: aten.conv_transpose2d.input,
}
_PATTERN_EPS = 1e-5  # the eps of torchao's conv-bn patterns, which convert_pt2e folds with
_STATE = "qlight_qat"  # GraphModule.meta key: {"observers_frozen": bool, "bn_frozen": bool}


def fake_quantizers(graph: nn.Module) -> list[FakeQuantizeBase]:
    return [module for module in graph.modules() if isinstance(module, FakeQuantizeBase)]


def is_prepared(module: nn.Module) -> bool:
    """Whether ``module`` is a graph returned by :func:`prepare`."""
    return isinstance(module, GraphModule) and _STATE in module.meta


def _untraceable(net: nn.Module, err: Exception) -> QlightError:
    # Dynamo's errors carry the user frame it stopped at; the message itself spans many lines.
    frame = (getattr(err, "real_stack", None) or [None])[-1]
    where = f" at {frame.filename}:{frame.lineno}: {(frame.line or '').strip()}" if frame is not None else ""
    reason = (str(err).strip().splitlines() or [""])[0]
    return QlightError(
        f"torch.export (strict) cannot trace {type(net).__name__}{where} ({type(err).__name__}: {reason}); "
        "make that code traceable or use QuantizationAwareTraining (weight-only fake-quant, no export)"
    )


def prepare(net: nn.Module, example: Tensor, quantizer) -> GraphModule:
    """Export ``net`` in training mode (strict, dynamic batch) and prepare it with ``quantizer``'s
    QAT config; the result trains like ``net`` and follows ``train()``/``eval()``.

    Raises:
        QlightError: when dynamo cannot export ``net``, naming the first call it cannot trace.
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    was_training = net.training
    net.train()  # the graph records batch_norm(training=True); set_phase flips it
    try:
        graph = export_batched(net, example, strict=True).module()
    except Exception as err:  # dynamo raises Unsupported, UserError, ... with the user's frame attached
        raise _untraceable(net, err) from None
    finally:
        net.train(was_training)
    with _patterns_for_convs_in(graph):
        prepared = prepare_qat_pt2e(graph, quantizer)
    _restore_batch_norm_literals(prepared, net)
    prepared.meta[_STATE] = {"observers_frozen": False, "bn_frozen": False}
    methods = {"train": types.MethodType(_train, prepared), "eval": types.MethodType(_eval, prepared)}
    for name, method in methods.items():  # in place of export's, which raise
        setattr(prepared, name, method)
    prepared.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = methods  # GraphModule.__deepcopy__ sets these on the copy
    set_phase(prepared, True)
    return prepared


@contextlib.contextmanager
def _patterns_for_convs_in(graph: GraphModule) -> Iterator[None]:
    """torchao matches its conv-bn patterns for each of conv1d, conv2d and the two transposed convs,
    exporting every pattern graph first (3 per kind to prepare, 24 to convert: about 25 s on 2 cores):
    try only the kinds ``graph`` holds."""
    from torchao.quantization.pt2e import qat_utils

    present = {node.target for node in graph.graph.nodes if node.op == "call_function"}

    def for_present_convs(helper: Callable) -> Callable:
        def run(m: GraphModule, conv_fn: Callable, *args: Any, **kwargs: Any) -> GraphModule:
            op = _CONVS.get(conv_fn)
            return m if op is not None and op not in present else helper(m, conv_fn, *args, **kwargs)

        return run

    with contextlib.ExitStack() as stack:
        for name in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper"):
            stack.enter_context(mock.patch.object(qat_utils, name, for_present_convs(getattr(qat_utils, name))))
        yield


def _restore_batch_norm_literals(prepared: GraphModule, net: nn.Module) -> None:
    """Put each BatchNorm's own momentum and eps back into the batch_norm nodes and into the
    ``running_var + eps`` of the fused conv-bn weight (``prepare_qat_pt2e`` writes 0.1 and 1e-5)."""
    for node in prepared.graph.nodes:
        if node.op != "call_function":
            continue
        args = list(node.args)
        if node.target in _BATCH_NORM and getattr(args[3], "op", None) == "get_attr":
            bn = net.get_submodule(args[3].target.rpartition(".")[0])
            args[6:8] = [args[6] if bn.momentum is None else bn.momentum, bn.eps]
        elif _is_running_var_plus_eps(node):
            args[1] = net.get_submodule(args[0].target.rpartition(".")[0]).eps
        else:
            continue
        node.args = tuple(args)
    prepared.recompile()


def _is_running_var_plus_eps(node: torch.fx.Node) -> bool:
    first = node.args[0] if node.args else None
    return (
        node.target == aten.add.Tensor
        and getattr(first, "op", None) == "get_attr"
        and first.target.endswith("running_var")
        and isinstance(node.args[1], float)
    )


def _counts_batches(node: torch.fx.Node) -> bool:
    first = node.args[0] if node.args else None
    return node.target == aten.add_.Tensor and str(getattr(first, "target", "")).endswith("num_batches_tracked")


def _set_literal(node: torch.fx.Node, index: int, value: object) -> bool:
    if node.args[index] == value:
        return False
    node.args = (*node.args[:index], value, *node.args[index + 1 :])
    return True


def set_phase(graph: GraphModule, training: bool) -> None:
    """Make ``graph`` train or evaluate: module flags, the ``training`` literal of its batch_norm
    (unless frozen) and dropout nodes, ``num_batches_tracked`` counting, and its observers (on only
    while training and not frozen). Cheap when nothing changes, so it can run every batch."""
    state = graph.meta[_STATE]
    bn_training = training and not state["bn_frozen"]
    changed = False
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _BATCH_NORM:
            changed |= _set_literal(node, _BATCH_NORM[node.target], bn_training)
        elif node.target in _DROPOUT:
            changed |= _set_literal(node, _DROPOUT[node.target], training)
        elif _counts_batches(node):
            changed |= _set_literal(node, 1, int(bn_training))
    if changed:
        graph.recompile()
    nn.Module.train(graph, training)
    observe = training and not state["observers_frozen"]
    for quantizer in fake_quantizers(graph):
        quantizer.enable_observer(observe)


def _train(graph: GraphModule, mode: bool = True) -> GraphModule:
    set_phase(graph, mode)
    return graph


def _eval(graph: GraphModule) -> GraphModule:
    set_phase(graph, False)
    return graph


def freeze(graph: GraphModule, observers: bool, batch_norm: bool) -> None:
    """Stop (or restart) observing activation ranges and weights, and updating BatchNorm statistics
    (BatchNorm then normalizes with its running statistics, as the folded conv will)."""
    graph.meta[_STATE] = {"observers_frozen": observers, "bn_frozen": batch_norm}
    set_phase(graph, graph.training)


def sync_observers(graph: GraphModule) -> None:
    """Copy rank 0's observers and BatchNorm statistics to every rank. DDP broadcasts rank 0's
    buffers before each forward, so the ranks differ by their last step's update; this is the copy the
    next forward would make, and keeps the scales the fused fake-quant computed. Call on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in graph.buffers():
            dist.broadcast(buffer, src=0)


def convert(graph: GraphModule) -> GraphModule:
    """An int8 graph on the CPU (where its kernels are), converted from a copy of ``graph`` with
    BatchNorm folded into the conv weights, that computes what ``graph`` computes in eval mode."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    model = copy.deepcopy(graph).cpu()
    set_phase(model, False)
    _absorb_eps(model)
    _use_trained_qparams(fake_quantizers(model))
    _drop_batch_counting(model)
    with _patterns_for_convs_in(model):
        converted = convert_pt2e(model)
    tidy_converted(converted)
    for name in ("train", "eval"):  # an inference graph: nn.Module's own train/eval again
        converted.__dict__.pop(name, None)
    for key in (_STATE, _USER_PRESERVED_ATTRIBUTES_KEY):
        converted.meta.pop(key, None)
    return converted


def _absorb_eps(graph: GraphModule) -> None:
    """Move ``eps - 1e-5`` into ``running_var``, so that convert_pt2e's fold with eps 1e-5 equals the
    layer's normalization with its own eps."""
    absorbed: set[str] = set()
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target in _BATCH_NORM and node.args[7] != _PATTERN_EPS:
            running_var = node.args[4].target
            if running_var not in absorbed:
                with torch.no_grad():
                    graph.get_buffer(running_var).add_(node.args[7] - _PATTERN_EPS)
                absorbed.add(running_var)
            _set_literal(node, 7, _PATTERN_EPS)
    for node in graph.graph.nodes:
        if node.op == "call_function" and _is_running_var_plus_eps(node) and node.args[0].target in absorbed:
            _set_literal(node, 1, _PATTERN_EPS)
    graph.recompile()


def _trained_qparams(quantizer: FakeQuantizeBase) -> tuple[Tensor, Tensor]:
    return quantizer.scale.detach().clone(), quantizer.zero_point.detach().clone()


def _use_trained_qparams(quantizers: Iterable[FakeQuantizeBase]) -> None:
    """Make convert_pt2e quantize with the scales the fused fake-quant used (ATen's choose_qparams:
    max(-min / 128, max / 127)) rather than the observer's (max|w| / 127.5): at 4 bits the two round
    differently enough to move logits by units."""
    for quantizer in quantizers:
        quantizer.calculate_qparams = types.MethodType(_trained_qparams, quantizer)


def _drop_batch_counting(graph: GraphModule) -> None:
    # The ``num_batches_tracked += 0`` nodes of an eval graph are dead in an inference graph.
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and _counts_batches(node) and not node.users:
            graph.graph.erase_node(node)
    graph.recompile()
