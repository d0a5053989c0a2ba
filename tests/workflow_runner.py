"""Runs a UI-format workflow (the JSON users drag into ComfyUI) through node classes, without ComfyUI.

Widget values are mapped to inputs the way the frontend's graph-to-prompt step does it: each node's widget
inputs (combos, INT, FLOAT, STRING, BOOLEAN without forceInput) take `widgets_values` in declaration order;
an `image_upload` combo is followed by its upload button's value, a seed-like INT by its "control after
generate" value; a widget input that has a link takes the linked output instead. Values are validated as
ComfyUI's server validates them (combo membership, numeric ranges), then nodes run in link order and every
returned value is checked against the node's RETURN_TYPES."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def input_specs(cls) -> list[tuple[str, object, dict, bool]]:
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, (kind, *rest) in spec.get(section, {}).items():
            out.append((name, kind, rest[0] if rest else {}, section == "required"))
    return out


def is_widget(kind, opts) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def extra_widget_values(name, kind, opts) -> int:
    """Widgets the frontend adds after an input's own widget (they take a slot in widgets_values)."""
    if opts.get("image_upload"):
        return 1
    if kind == "INT" and (name in ("seed", "noise_seed") or opts.get("control_after_generate")):
        return 1
    return 0


def check_value(node_type: str, name: str, kind, opts, value) -> None:
    where = f"{node_type}.{name}"
    if isinstance(kind, list):
        assert value in kind, f"{where}: {value!r} is not one of {kind}"
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} not a number"
        if kind == "INT":
            assert value == int(value), f"{where}: {value!r} is not an integer"
        assert opts.get("min", -float("inf")) <= value <= opts.get("max", float("inf")), f"{where}: {value} out of range"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"


def check_output(node_type: str, kind: str, value, t) -> None:
    """`value` is what a node returned for an output of type `kind`; `t` is the plugin's nodes.types module."""
    where = f"{node_type} output {kind}"
    if kind == "IMAGE":
        assert isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-1] == 3, where
        assert value.dtype == torch.float32 and 0 <= float(value.min()) and float(value.max()) <= 1, where
    elif kind == "MASK":
        assert isinstance(value, torch.Tensor) and value.dim() == 3, where
    elif kind == "LATENT":
        assert isinstance(value, dict) and isinstance(value["samples"], torch.Tensor), where
        assert value["samples"].dim() == 4, where
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif kind == "FLOAT":
        assert isinstance(value, float), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "DIFFO_MODEL":
        assert hasattr(value, "fingerprint") and hasattr(value, "latent_codec"), where
    elif kind == "DIFFO_BITSTREAM":
        assert isinstance(value, t.Bitstreams) and all(isinstance(b, bytes) for b in value) and value, where
    elif kind == "DIFFO_LATENT":
        assert isinstance(value, t.CodedLatents) and len(value.headers) == len(value.c_hat), where
    elif kind == "DIFFO_CONTROL":
        assert isinstance(value, t.Controls) and len(value.outputs) == len(value.headers), where
    else:
        raise AssertionError(f"{where}: no check for type {kind}")


@dataclass
class Run:
    outputs: dict[int, tuple] = field(default_factory=dict)  # node id → returned values
    ui: dict[int, dict] = field(default_factory=dict)  # node id → its "ui" dict
    types: dict[int, str] = field(default_factory=dict)  # node id → node type

    def of_type(self, node_type: str) -> list[int]:
        return [i for i, t in self.types.items() if t == node_type]


def run_workflow(path: Path, plugin, core_nodes: dict) -> Run:
    """Run the workflow at `path` with the plugin's nodes (the module ComfyUI would import) and `core_nodes`."""
    classes = {**core_nodes, **plugin.NODE_CLASS_MAPPINGS}
    wf = json.loads(Path(path).read_text())
    links = {link[0]: link for link in wf["links"]}  # id → [id, from node, from slot, to node, to slot, type]
    nodes = {n["id"]: n for n in wf["nodes"] if n.get("mode", 0) == 0}
    run = Run()
    pending = dict(nodes)
    while pending:
        ready = [i for i, n in pending.items()
                 if all(links[inp["link"]][1] in run.outputs for inp in n.get("inputs", []) if inp.get("link"))]
        assert ready, f"{path.name}: the graph has a cycle or a link from a missing node"
        for node_id in sorted(ready):
            node = pending.pop(node_id)
            _run_node(node, classes, links, run, Path(path).name, plugin.nodes.types)
    return run


def _run_node(node: dict, classes: dict, links: dict, run: Run, wf_name: str, types_module) -> None:
    node_type = node["type"]
    assert node_type in classes, f"{wf_name}: node type {node_type} is not registered"
    cls = classes[node_type]
    linked = {inp["name"]: links[inp["link"]] for inp in node.get("inputs", []) if inp.get("link") is not None}
    values = list(node.get("widgets_values", []))
    kwargs, pos = {}, 0
    for name, kind, opts, required in input_specs(cls):
        if is_widget(kind, opts):
            assert pos < len(values), f"{wf_name}: {node_type} has too few widget values"
            widget_value = values[pos]
            pos += 1 + extra_widget_values(name, kind, opts)
            if name not in linked:
                check_value(node_type, name, kind, opts, widget_value)
                kwargs[name] = widget_value
        if name in linked:
            _, src, slot, _, _, link_type = linked[name]
            value = run.outputs[src][slot]
            if not isinstance(kind, list) and kind != "*":
                assert link_type == kind or (kind in WIDGET_TYPES and link_type == kind), \
                    f"{wf_name}: {node_type}.{name} takes {kind}, the link carries {link_type}"
            if is_widget(kind, opts):
                check_value(node_type, name, kind, opts, value)
            kwargs[name] = value
        elif required and not is_widget(kind, opts):
            raise AssertionError(f"{wf_name}: required input {node_type}.{name} has no link")
    assert pos == len(values), f"{wf_name}: {node_type} has {len(values)} widget values, its widgets take {pos}"
    result = getattr(cls(), cls.FUNCTION)(**kwargs)
    ui = {}
    if isinstance(result, dict):
        ui = result.get("ui", {})
        result = result.get("result", ())
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES), \
        f"{node_type} returned {len(result)} values for RETURN_TYPES {cls.RETURN_TYPES}"
    for kind, value in zip(cls.RETURN_TYPES, result):
        check_output(node_type, kind, value, types_module)
    run.outputs[node["id"]] = result
    run.ui[node["id"]] = ui
    run.types[node["id"]] = node_type
