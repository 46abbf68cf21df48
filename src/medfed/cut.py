"""A network cut into three parts for split learning (``topology: {kind: split}``).

The network's ``forward`` is traced once with ``torch.fx`` into a list of operations (the
leaf layers it calls and the functions between them: ``flatten``, ``add``, ``cat``...).
``topology.cut`` names a module of ``model.named_modules()``; the front part ends after the
last operation of that module. ``topology.head`` (default: the last top-level layer) names
the module where the back part begins. So for the small CNN (``features``, ``pool``,
``head``) ``cut: features.0`` gives:

    front  (site)   x -> features.0                        -> activations A  (B, w, H/2, W/2)
    middle (server) A -> features.1, features.2, pool, flatten -> activations Z  (B, 4w)
    back   (site)   Z -> head                              -> logits (B, K)

Without the U (``topology.u_shaped: false``) the network is cut in two: the middle runs
from the cut to the network's output and there is no back (``ModelCut.back`` is None); the
site keeps the front alone, the server the rest and the loss.

Each part is a ``torch.fx.GraphModule`` over the *same* layer objects as the network: loading
a state dict into the network loads the parts, and training a part trains the network. Each
state-dict entry belongs to one part (:attr:`ModelCut.site_keys`, :attr:`ModelCut.middle_keys`),
under the network's own names, so the three parts put together are the network's state dict.

A cut is refused (ConfigError naming ``topology.cut`` or ``topology.head``) when the name is
no module of the network, when more than one tensor would cross it (a skip connection, as in
a U-Net's encoder, or the input reused later), when nothing is left between the two cuts for
the server, when a layer's weights would be used on both sides, when the network cannot be
traced (control flow that depends on the data), or when it has forward hooks on layers the
trace goes through (``task.residual``'s input skip), which a traced copy would lose.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import fx, nn

from medfed.core.errors import ConfigError

_SHOWN = 8  # valid cut names listed in an error


@dataclass(frozen=True)
class ModelCut:
    """The three parts of a network (see the module docstring). ``front`` takes the
    network's input; ``middle`` the front's output; ``back`` the middle's output and
    returns the network's output (None without the U: the middle returns it). ``site_keys``:
    the state-dict entries of front and back (what a site holds); ``middle_keys``: the
    others (what the server holds, entries of no part included)."""

    front: fx.GraphModule
    middle: fx.GraphModule
    back: fx.GraphModule | None
    site_keys: frozenset[str]
    middle_keys: frozenset[str]

    @property
    def u_shaped(self) -> bool:
        """Whether the site holds the last layers and the loss (a back part)."""
        return self.back is not None

    def site_parts(self) -> nn.ModuleList:
        """Front and back as one module: the parameters a site trains."""
        return nn.ModuleList([self.front] if self.back is None else [self.front, self.back])


def default_head(model: nn.Module) -> str:
    """The last top-level layer of ``model``: where the back part begins by default."""
    children = [n for n, _ in model.named_children()]
    if not children:
        raise ConfigError("topology.cut: the network has no layers to cut between; split learning needs a network "
                          "made of named layers")
    return children[-1]


def cut_model(model: nn.Module, cut: str, head: str | None = None, u_shaped: bool = True) -> ModelCut:
    """``model`` cut after module ``cut`` and before module ``head`` (default
    :func:`default_head`); with ``u_shaped`` False after ``cut`` only (no back part, ``head``
    must be None). Raises ConfigError naming the field (see the module docstring)."""
    if not u_shaped:
        if head is not None:
            raise ConfigError(f"topology.head: '{head}' with topology.u_shaped: false, where the site keeps no last "
                              "layers; leave topology.head out")
        return _cut_in_two(model, cut)
    head = head if head is not None else default_head(model)
    modules = dict(model.named_modules())
    for field, name in (("topology.cut", cut), ("topology.head", head)):
        if name not in modules or not name:
            raise ConfigError(f"{field}: the network has no module '{name}'{_suggest(name, list(modules))}")
    _check_hooks(model)
    nodes = _trace(model)
    cut_end = _last_of(nodes, cut)
    head_start = _first_of(nodes, head)
    if cut_end is None:
        raise ConfigError(f"topology.cut: module '{cut}' is not called by the network's forward; "
                          f"{_cut_at(nodes, modules, head_start)}")
    if head_start is None:
        raise ConfigError(f"topology.head: module '{head}' is not called by the network's forward")
    last = f"the last top-level layer '{head}'" if head == default_head(model) else f"topology.head '{head}'"
    if cut_end >= head_start:
        raise ConfigError(f"topology.cut: '{cut}' does not end before {last} begins; the back part, with the loss, "
                          f"stays at the site: {_cut_at(nodes, modules, head_start)}, or set topology.head")
    if cut_end + 1 == head_start:
        raise ConfigError(f"topology.cut: '{cut}' leaves nothing between it and {last} for the server to run; "
                          f"{_cut_at(nodes, modules, head_start)}")
    into_middle = _one_crossing(nodes, modules, cut, cut_end, head_start)
    into_back = _crossing(nodes, head_start)
    if len(into_back) != 1 or nodes.index(into_back[0]) <= cut_end:
        raise ConfigError(
            f"topology.head: {len(into_back)} tensor(s) cross into '{head}' "
            f"({', '.join(n.name for n in into_back)}); the back part must take the server's output alone; name "
            "the module where the network's last layers begin"
        )
    front = _part(model, nodes[: cut_end + 1], None, into_middle[0])
    middle = _part(model, nodes[cut_end + 1 : head_start], into_middle[0], into_back[0])
    back = _part(model, nodes[head_start:], into_back[0], None)
    keys = [set(p.state_dict()) for p in (front, middle, back)]
    shared = (keys[0] & keys[1]) | (keys[1] & keys[2]) | (keys[0] & keys[2])
    if shared:
        raise ConfigError(f"topology.cut: the weights '{sorted(shared)[0]}' are used on both sides of the cut; "
                          "cut where no layer is shared between the site's and the server's parts")
    site = frozenset(keys[0] | keys[2])
    return ModelCut(front, middle, back, site, frozenset(k for k in model.state_dict() if k not in site))


def _cut_in_two(model: nn.Module, cut: str) -> ModelCut:
    """``model`` cut after module ``cut``: the front and, from there to the output, the middle."""
    modules = dict(model.named_modules())
    if cut not in modules or not cut:
        raise ConfigError(f"topology.cut: the network has no module '{cut}'{_suggest(cut, list(modules))}")
    _check_hooks(model)
    nodes = _trace(model)
    cut_end = _last_of(nodes, cut)
    if cut_end is None:
        raise ConfigError(f"topology.cut: module '{cut}' is not called by the network's forward; "
                          f"{_cut_at(nodes, modules, None)}")
    if cut_end + 2 >= len(nodes):  # only the output node after it
        raise ConfigError(f"topology.cut: '{cut}' leaves nothing after it for the server to run; "
                          f"{_cut_at(nodes, modules, None)}")
    into_middle = _one_crossing(nodes, modules, cut, cut_end, None)
    front = _part(model, nodes[: cut_end + 1], None, into_middle[0])
    middle = _part(model, nodes[cut_end + 1 :], into_middle[0], None)
    site = set(front.state_dict())
    shared = site & set(middle.state_dict())
    if shared:
        raise ConfigError(f"topology.cut: the weights '{sorted(shared)[0]}' are used on both sides of the cut; "
                          "cut where no layer is shared between the site's and the server's parts")
    return ModelCut(front, middle, None, frozenset(site), frozenset(k for k in model.state_dict() if k not in site))


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, [n for n in names if n], n=3)
    top = [n for n in names if n and "." not in n]
    return f"; did you mean {', '.join(close)}?" if close else f"; its top-level layers are {top}"


def _check_hooks(model: nn.Module) -> None:
    tracer = fx.Tracer()
    for name, m in model.named_modules():
        leaf = name and tracer.is_leaf_module(m, name)
        if not leaf and (m._forward_hooks or m._forward_pre_hooks):
            where = f"'{name}'" if name else "the network itself"
            raise ConfigError(
                f"topology.cut: {where} has a forward hook (e.g. task.residual's input skip) that a cut network would "
                "lose; split learning needs a network whose forward says all it computes"
            )


def _trace(model: nn.Module) -> list[fx.Node]:
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # torch.fx raises many types on what it cannot trace
        raise ConfigError(
            f"topology.cut: the network cannot be traced into a sequence of operations ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); split learning needs a forward without "
            "control flow that depends on the data, such as small_cnn, resnet18 or densenet121"
        ) from None
    return list(graph.nodes)


def _owned(node: fx.Node, module: str) -> bool:
    if node.op not in ("call_module", "get_attr"):
        return False
    target = str(node.target)
    return target == module or target.startswith(module + ".")


def _last_of(nodes: list[fx.Node], module: str) -> int | None:
    found = [i for i, n in enumerate(nodes) if _owned(n, module)]
    return found[-1] if found else None


def _first_of(nodes: list[fx.Node], module: str) -> int | None:
    return next((i for i, n in enumerate(nodes) if _owned(n, module)), None)


def _crossing(nodes: list[fx.Node], at: int) -> list[fx.Node]:
    """The values computed before position ``at`` and used from it on."""
    after = set(nodes[at:])
    return [n for n in nodes[:at] if any(u in after for u in n.users)]


def _one_crossing(nodes: list[fx.Node], modules: dict[str, nn.Module], cut: str, cut_end: int,
                  before: int | None) -> list[fx.Node]:
    """The one tensor that crosses the cut after node ``cut_end`` (a list of it), else a
    ConfigError naming those that do and suggesting cuts (before node ``before``)."""
    into_middle = _crossing(nodes, cut_end + 1)
    if len(into_middle) != 1:
        raise ConfigError(
            f"topology.cut: {len(into_middle)} tensors cross the cut after '{cut}' "
            f"({', '.join(n.name for n in into_middle)}: a skip connection or an input used again later); one must, "
            f"the activations of one layer; {_cut_at(nodes, modules, before)}"
        )
    return into_middle


def _cut_at(nodes: list[fx.Node], modules: dict[str, nn.Module], before: int | None) -> str:
    """What to do instead: the valid cuts, or that there are none."""
    valid = _valid_cuts(nodes, modules, before)
    if valid:
        return f"cut at one of {valid}"
    return ("this network has no layer before the back part after which one tensor alone crosses (skip "
            "connections), so split learning cannot cut it; use another network or topology")


def _valid_cuts(nodes: list[fx.Node], modules: dict[str, nn.Module], before: int | None = None) -> list[str]:
    """Module names (outermost first) a cut after which exactly one tensor crosses, before
    position ``before``."""
    stop = before if before is not None else len(nodes) - 1
    out = []
    for name in sorted((n for n in modules if n), key=lambda n: (n.count("."), list(modules).index(n))):
        end = _last_of(nodes, name)
        if end is not None and end + 1 < stop and len(_crossing(nodes, end + 1)) == 1:
            out.append(name)
        if len(out) == _SHOWN:
            break
    return out


def _part(model: nn.Module, nodes: list[fx.Node], given: fx.Node | None, result: fx.Node | None) -> fx.GraphModule:
    """A GraphModule running ``nodes`` over ``model``'s own layers: its input ``given`` (None:
    the network's own inputs), its output ``result`` (None: the network's output node)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if given is not None:
        env[given] = graph.placeholder("activations")
    for n in nodes:
        copied = graph.node_copy(n, lambda m: env[m])
        env[n] = copied
    if result is not None:
        graph.output(env[result])
    return fx.GraphModule(model, graph)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s values as they travel."""
    return t.numel() * t.element_size()


def activation_shape(parts: ModelCut, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the activations at the cut for one example of ``input_shape`` (C,
    spatial...): what a site in a deployment may send per example (the server refuses any
    other). Runs the front once on zeros, in eval mode (no statistics change), no gradient."""
    was = parts.front.training
    parts.front.eval()
    try:
        with torch.no_grad():
            param = next(iter(parts.front.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
            out = parts.front(torch.zeros((1, *input_shape), device=device))
    finally:
        parts.front.train(was)
    return tuple(out.shape[1:])
