"""The package's shape: no import circle, folders that import only downward, and one owner of the bytes
a quantized layer takes."""

import ast
import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from qlight.quantization.grid.intx import intx_weight, set_weight
from qlight.quantization.grid.sizes import stored_weight_bytes, weight_bytes
from qlight.quantization.io.serialization import quantized_bytes
from qlight.quantization.recipes.base import quantizable_modules
from qlight.quantization.recipes.sensitivity import layer_sensitivity
from qlight.quantization.recipes.weight_only import IntxWeightOnly

PACKAGE = Path(__file__).resolve().parents[1] / "qlight"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """qlight module -> the qlight modules it imports, anywhere in its code (a lazy import inside a
    function is an import all the same). ``from package import name`` is an import of the submodule
    when ``name`` is one, else of the package."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qlight":
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    edges.add(submodule if submodule in modules else node.module)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for following in sorted(graph.get(node, ())):
            if state.get(following) == 1:
                return path[path.index(following) :] + [following]
            if following not in state and (cycle := visit(following)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_in_qlight():
    graph = import_graph()
    assert "qlight.quantization.recipes.base" in graph["qlight.quantization.recipes.mixed"]  # the graph is read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# qlight.quantization's folders, bottom first: each may import only itself and the folders before it.
LAYERS = ("grid", "runtimes", "methods", "recipes", "qat", "io", "callbacks")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` for every import of a quantization folder drawn above the importer's
    (a module at the package's root, such as ``lightning_plumbing``, stands below every folder)."""

    def layer(module: str) -> int | None:
        parts = module.split(".")
        if parts[:2] != ["qlight", "quantization"] or len(parts) < 3:
            return None
        return LAYERS.index(parts[2]) if parts[2] in LAYERS else -1

    return sorted(
        f"{importer} -> {imported}"
        for importer, edges in graph.items()
        for imported in edges
        if importer != "qlight.quantization"  # the package re-exports the public names
        and layer(importer) is not None
        and layer(imported) is not None
        and layer(imported) > layer(importer)
    )


def test_quantization_folders_import_only_the_folders_below_them():
    graph = import_graph()
    folders = {p.name for p in (PACKAGE / "quantization").iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(LAYERS)
    assert upward_imports(graph) == []


def test_an_upward_import_is_found():
    graph = {"qlight.quantization.grid.intx": {"qlight.quantization.recipes.base"}}
    graph |= {"qlight.quantization.lightning_plumbing": {"qlight.quantization.callbacks.ptq"}}
    graph |= {"qlight.quantization.callbacks.ptq": {"qlight.quantization.grid.intx", "qlight.errors"}}
    assert upward_imports(graph) == [
        "qlight.quantization.grid.intx -> qlight.quantization.recipes.base",
        "qlight.quantization.lightning_plumbing -> qlight.quantization.callbacks.ptq",
    ]


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("granularity", ["per_channel", "per_kernel_position"])
def test_the_budget_the_sensitivity_table_and_the_saved_file_count_the_same_bytes(granularity):
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 10))
    layers = quantizable_modules(net)
    x = torch.randn(4, 3, 8, 8)
    bits = list(range(2, 9))

    def rtn(model, layer, layer_bits):
        module = model.get_submodule(layer)
        set_weight(module, intx_weight(module.weight, layer_bits, granularity))

    table = {(r["layer"], r["bits"]): r["bytes"] for r in layer_sensitivity(net, layers, bits, [x], rtn, granularity)}
    for b in bits:
        recipe = IntxWeightOnly(b, granularity)
        model = recipe.quantize(copy.deepcopy(net), layers)
        payload = torch.load(io.BytesIO(quantized_bytes(model, recipe, layers, net, x)), weights_only=True)
        for layer in layers:
            budget = weight_bytes(net.get_submodule(layer).weight.shape, b, granularity)
            stored = stored_weight_bytes(payload["state_dict"][f"{layer}.weight"])
            assert budget == stored == table[layer, b], (layer, b)


def test_the_readme_layout_names_every_folder_and_the_public_names_import_from_qlight():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout") : readme.index("## Known limits")]
    folders = sorted(
        str(p.relative_to(PACKAGE.parent)) + "/" for p in PACKAGE.rglob("*") if (p / "__init__.py").is_file()
    )
    assert [f for f in folders if f not in layout] == []
    import qlight

    assert all(getattr(qlight, name) is not None for name in qlight.__all__)
