"""What each leaf Linear/Conv layer of a denoiser is: one role among ``ROLES``.

Roles come from the family's declarative role table (regex -> role, first match wins).
Without a table, or on request, they are detected: ``time_emb`` layers by two probe
forwards (their inputs depend on the timestep and not on the latent), the other roles
by module type and name heuristics. Every decision records how it was made.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qvd_bench.errors import UserError
from qvd_bench.models.family import ROLES, LoadedModel, expert_layer_name

LEAF_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Two timestep values for the probe forwards (inside every family's training range).
PROBE_TIMESTEPS = (250.0, 750.0)


@dataclass(frozen=True)
class RoleDecision:
    """The role of one layer and how it was decided.

    Attributes:
        role: one of ``ROLES``.
        decided_by: "table:<pattern>", "probe", or "heuristic:<rule>".
    """

    role: str
    decided_by: str


def leaf_layers(denoiser: nn.Module, names: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Every Linear / Conv1d / Conv2d / Conv3d (subclasses included), in module order.

    Args:
        denoiser: the model.
        names: only these qualified names (those that are leaf layers, in this order),
            looked up one by one instead of walking every module.

    Returns:
        Qualified module name -> module.
    """
    if names is None:
        return {n: m for n, m in denoiser.named_modules() if isinstance(m, LEAF_TYPES)}
    found = {}
    for name in names:
        try:
            module = denoiser.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, LEAF_TYPES):
            found[name] = module
    return found


def classify(loaded: LoadedModel, *, detect: bool = False) -> dict[str, RoleDecision]:
    """Roles of every leaf layer of ``loaded``'s denoiser (of every expert).

    Args:
        loaded: the model; its family supplies the role table and the probe forward.
        detect: ignore the table: find time_emb layers by probe forwards and the rest
            by heuristics. Also used when the family has an empty table.

    Returns:
        Qualified layer name -> RoleDecision, in module order; with several experts each
        expert is classified on its own and its layer names carry its attribute.

    Raises:
        UserError: a layer that no pattern of the table matches.
    """
    if loaded.multi_expert:
        return {
            expert_layer_name(expert, name): decision
            for expert in loaded.experts
            for name, decision in classify(loaded.expert_model(expert), detect=detect).items()
        }
    layers = leaf_layers(loaded.denoiser)
    table = loaded.family.role_table
    if table and not detect:
        return _classify_by_table(layers, table, loaded.family.denoiser_class)
    time_emb = detect_time_emb(loaded)
    decisions = {}
    for name, module in layers.items():
        if name in time_emb:
            decisions[name] = RoleDecision("time_emb", "probe")
        else:
            role, rule = _heuristic_role(name, module, loaded.denoiser)
            decisions[name] = RoleDecision(role, f"heuristic:{rule}")
    return decisions


def _classify_by_table(
    layers: dict[str, nn.Module], table: tuple[tuple[str, str], ...], denoiser_class: str
) -> dict[str, RoleDecision]:
    compiled = [(re.compile(pattern), pattern, role) for pattern, role in table]
    for _, pattern, role in compiled:
        if role not in ROLES:
            raise ValueError(
                f"role table of {denoiser_class}: {pattern!r} -> unknown role {role!r}"
            )
    decisions = {}
    unmatched = []
    for name in layers:
        for regex, pattern, role in compiled:
            if regex.fullmatch(name):
                decisions[name] = RoleDecision(role, f"table:{pattern}")
                break
        else:
            unmatched.append(name)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (
            f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        )
        raise UserError(
            f"the {denoiser_class} role table matches no pattern for layer(s) {shown}; "
            "classify with detect=True to detect roles instead"
        )
    return decisions


def detect_time_emb(loaded: LoadedModel) -> set[str]:
    """Leaf layers whose inputs depend on the timestep but not on the latent.

    Runs three forwards on the family's probe latent (batch 1): latent a at timestep t1,
    latent b at t1, latent a at t2. A layer is time_emb if its inputs are identical in
    the first two and differ in the first and third.

    Returns:
        Names of the detected timestep-embedding layers.
    """
    family, denoiser = loaded.family, loaded.denoiser
    parameter = next(denoiser.parameters())
    device, dtype = parameter.device, parameter.dtype
    frames, height, width = family.probe_size(denoiser)
    shape = family.latent_shape(denoiser, 1, frames, height, width)
    generator = torch.Generator().manual_seed(0)
    latent_a = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    latent_b = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    text_states = torch.randn((1, *family.text_embedding_shape(denoiser)), generator=generator)
    text_states = text_states.to(device=device, dtype=dtype)
    conditioning = family.conditioning(denoiser, 1, frames, height, width, generator=generator)
    t1, t2 = (torch.tensor([t], device=device) for t in PROBE_TIMESTEPS)

    def run(latents: torch.Tensor, timestep: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        with LayerInputCapture(denoiser) as inputs, torch.no_grad():
            family.forward(denoiser, latents, timestep, text_states, conditioning)
        return inputs

    base = run(latent_a, t1)
    other_latent = run(latent_b, t1)
    other_timestep = run(latent_a, t2)
    detected = set()
    for name, calls in base.items():
        if not calls:
            continue
        latent_free = _same_calls(calls, other_latent[name])
        timestep_bound = not _same_calls(calls, other_timestep[name])
        if latent_free and timestep_bound:
            detected.add(name)
    return detected


class LayerInputCapture:
    """Context manager that records the input of every leaf layer call.

    Yields a dict name -> list of input tensors (one per call, detached clones).
    Pre-hooks use ``with_kwargs=True`` because some diffusers Linears get ``input=``.
    """

    def __init__(self, denoiser: nn.Module):
        self.denoiser = denoiser
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> dict[str, list[torch.Tensor]]:
        for name, module in leaf_layers(self.denoiser).items():
            self.inputs[name] = []
            hook = self._make_hook(self.inputs[name])
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self.inputs

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _make_hook(store: list[torch.Tensor]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            value = args[0] if args else kwargs["input"]
            store.append(value.detach().clone())

        return hook


def _same_calls(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


# Name heuristics, tried in order on the lower-cased qualified name of a layer that is
# not time_emb. Each is (rule name, regex searched in the name, role).
_NAME_HEURISTICS: tuple[tuple[str, str, str], ...] = (
    ("temporal-name", r"(^|\.)(temp\w*|temporal\w*|motion\w*|time_pos\w*)(\.|$)", "temporal"),
    ("cross-attention-name", r"(^|\.)(attn2|cross_attn\w*)\.", "cross_attn"),
    ("attention-name", r"(^|\.)(attn\d*|attention|self_attn\w*)\.", "self_attn"),
    ("ffn-name", r"(^|\.)(ff|ffn|ff_in|mlp|feed_forward)\.", "ffn"),
    ("io-name", r"^(conv_in|conv_out|proj_out|proj_in|patch_embed\w*|pos_embed\w*)(\.|$)", "io"),
    ("embedding-name", r"(embed\w*|projection)(\.|$)", "io"),
)


# Classes of temporal blocks (TransformerTemporalModel, TemporalConvLayer,
# TemporalResnetBlock, ...), but not of blocks mixing both (...SpatioTemporal...).
_TEMPORAL_CLASS = re.compile(r"(?<!Spatio)Temporal")


def _heuristic_role(name: str, module: nn.Module, denoiser: nn.Module) -> tuple[str, str]:
    """(role, rule) for a layer by the classes of its ancestors, its name and its type."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        ancestor = type(denoiser.get_submodule(".".join(parts[:depth]))).__name__
        if _TEMPORAL_CLASS.search(ancestor):
            return "temporal", f"temporal-module:{ancestor}"
    lowered = name.lower()
    for rule, pattern, role in _NAME_HEURISTICS:
        if re.search(pattern, lowered):
            return role, rule
    if isinstance(module, nn.Conv3d):
        kernel = module.kernel_size
        if kernel[0] > 1 and tuple(kernel[1:]) == (1, 1):
            return "temporal", "conv3d-temporal-kernel"
        return "spatial_conv", "conv3d"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "spatial_conv", "conv"
    # Remaining Linears are token-wise projections inside blocks (transformer proj_in/out).
    return "spatial_conv", "other-linear"


def format_roles(decisions: dict[str, RoleDecision]) -> str:
    """A plain-text table: one line per layer (name, role, how decided), then counts per role."""
    if not decisions:
        return "(no Linear/Conv layers)"
    name_width = max(len("layer"), *(len(name) for name in decisions))
    role_width = max(len(role) for role in ROLES)
    lines = [f"{'layer':<{name_width}}  {'role':<{role_width}}  decided by"]
    lines.append(f"{'-' * name_width}  {'-' * role_width}  {'-' * 10}")
    for name, decision in decisions.items():
        lines.append(f"{name:<{name_width}}  {decision.role:<{role_width}}  {decision.decided_by}")
    counts = Counter(decision.role for decision in decisions.values())
    summary = ", ".join(f"{role} {counts[role]}" for role in ROLES if counts[role])
    lines.append("")
    lines.append(f"{len(decisions)} layers: {summary}")
    return "\n".join(lines)
