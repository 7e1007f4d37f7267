"""Per-input-channel transforms of Linear/Conv layers and where they fold exactly.

A transform with shift z (C,) and scale s (C,) computes a layer on X̃ = (X − z)/s with
W̃ = W·diag(s) and b̃ = b + W·z (summed over a conv's kernel), which leaves its output
unchanged (SCRI, OS+, SmoothQuant with z = 0). Where what produces
the input can absorb the transform, it folds there exactly (``KINDS``):

- ``folded_norm``: into the affine of a norm that feeds the layer directly (GroupNorm /
  LayerNorm): γ' = γ/s, β' = (β − z)/s;
- ``folded_adaln``: into the Linear that computes a norm's modulation (shift, scale) from
  the timestep, one Linear per block (CogVideoX's adaLN-zero): its shift rows become
  (shift − z)/s and its scale rows (1 + scale)/s − 1, exact at every timestep;
- ``folded_adaln_shift``: into the per-block modulation table of adaLN-single (Latte,
  PixArt) and Wan, where shift = table[k] + m(t) with m one Linear shared by every block:
  z folds into the table row exactly (table[k] − z), s cannot (it would scale m(t) for
  every block at once), so the wrapper still divides by s (nothing when s = 1);
- ``folded_geglu_scale``: into the linear half of a GEGLU / SwiGLU projection feeding the
  FFN output layer, X = h ⊙ act(gate): h/s gives X/s exactly, X − z has no such form, so
  the wrapper still subtracts z/s (nothing when z = 0);
- ``explicit``: everywhere else (an activation, a reshape with a pad, or nothing that
  can absorb it between the norm and the layer): the wrapper computes (X − z)/s before
  its quantizer (``QuantWrapper.set_input_transform``).

What the wrapper still computes is the record's ``input_shift`` / ``input_scale``: the
whole (z, s) when explicit, the part a partial fold leaves, None when fully folded.

Every layer one source feeds gets the same (z, s) (q, k and v of a self-attention).
Sites come from ``FOLD_TABLE``, a small declarative table keyed by block class, never by
model name; a site is used only when its checks pass (the source exists with the right
shape, consumers exist, convs are unpadded, the attention applies no norm of its own).
A site's source may itself be a transformed layer (a modulation Linear, a GEGLU
projection): such sites go first (``fold_order``) so that the layer is transformed with
its rewritten rows. Folds rewrite parameters in place; ``restore_parameters`` puts the
values ``apply_channel_transform`` replaced back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qvd_bench.errors import UserError
from qvd_bench.models.family import LoadedModel
from qvd_bench.models.roles import leaf_layers
from qvd_bench.quant.modules import CONV_TYPES, QuantWrapper, swap_module

KINDS = ("folded_norm", "folded_adaln", "folded_adaln_shift", "folded_geglu_scale", "explicit")
# Kinds whose source is a parameter of the block (a modulation table), not a module.
_TABLE_KINDS = ("folded_adaln_shift",)

_QKV = ("to_q", "to_k", "to_v")
_LN_TYPES = ("layer_norm", "layer_norm_i2vgen")


def _qkv(attn: str) -> tuple[str, ...]:
    return tuple(f"{attn}.{p}" for p in _QKV)


def _plain_ln(block: nn.Module) -> bool:
    """A BasicTransformerBlock whose norms feed its layers directly."""
    return getattr(block, "norm_type", "layer_norm") in _LN_TYPES and (
        getattr(block, "pos_embed", None) is None
    )


def _self_attn2(block: nn.Module) -> bool:
    attn2 = getattr(block, "attn2", None)
    return attn2 is not None and not attn2.is_cross_attention


def _cross_attn2(block: nn.Module) -> bool:
    attn2 = getattr(block, "attn2", None)
    return attn2 is not None and attn2.is_cross_attention


def _ada_single(block: nn.Module) -> bool:
    """A BasicTransformerBlock modulated by adaLN-single (its own table + a shared Linear)."""
    return getattr(block, "norm_type", "") == "ada_norm_single" and (
        getattr(block, "pos_embed", None) is None
    )


def _gated_ffn(ff: nn.Module) -> bool:
    """A FeedForward whose output Linear reads h ⊙ act(gate) through a dropout only."""
    net = getattr(ff, "net", None)
    return (
        isinstance(net, nn.ModuleList)
        and len(net) >= 3
        and type(net[0]).__name__ in _GATED_ACTIVATIONS
        and isinstance(net[1], nn.Dropout)
        and isinstance(net[2], nn.Linear)
    )


# Gated activations computing proj(x).chunk(2) -> (h, gate) -> h * act(gate).
_GATED_ACTIVATIONS = ("GEGLU", "SwiGLU")


@dataclass(frozen=True)
class FoldRule:
    """One exact fold site of a block class.

    Attributes:
        blocks: block class names the rule applies to.
        source: relative to the block: the norm (``folded_norm``), the modulation Linear
            (``folded_adaln``), the modulation table parameter (``folded_adaln_shift``)
            or the gated projection Linear (``folded_geglu_scale``).
        layers: the layers the source feeds, relative to the block; all get one (z, s).
        kind: one of ``KINDS`` except "explicit".
        when: extra structural condition on the block.
        chunks: adaLN kinds: the number of equal row chunks of the modulation Linear or
            table (the table's last axis is the channel axis).
        pairs: adaLN kinds: (shift chunk, scale chunk) of every stream feeding the layers.
    """

    blocks: tuple[str, ...]
    source: str
    layers: tuple[str, ...]
    kind: str = "folded_norm"
    when: Callable[[nn.Module], bool] = lambda block: True
    chunks: int = 0
    pairs: tuple[tuple[int, int], ...] = ()


_BASIC = ("BasicTransformerBlock", "TemporalBasicTransformerBlock")

FOLD_TABLE: tuple[FoldRule, ...] = (
    # Transformer wrappers: GroupNorm -> proj_in (1x1 conv, or Linear after a reshape).
    FoldRule(
        (
            "Transformer2DModel",
            "TransformerTemporalModel",
            "AnimateDiffTransformer3D",
            "TransformerSpatioTemporalModel",
        ),
        "norm",
        ("proj_in",),
    ),
    # Self-attention: one norm feeds q, k and v.
    FoldRule(
        ("BasicTransformerBlock",),
        "norm1",
        _qkv("attn1"),
        when=lambda b: _plain_ln(b) and not b.only_cross_attention,
    ),
    FoldRule(
        ("TemporalBasicTransformerBlock", "I2VGenXLTransformerTemporalEncoder"),
        "norm1",
        _qkv("attn1"),
    ),  # fmt: skip
    # Cross-attention: only the query comes from the norm (keys/values from the text).
    FoldRule(_BASIC, "norm2", ("attn2.to_q",), when=lambda b: _plain_ln(b) and _cross_attn2(b)),
    FoldRule(_BASIC, "norm2", _qkv("attn2"), when=lambda b: _plain_ln(b) and _self_attn2(b)),
    FoldRule(("WanTransformerBlock",), "norm2", ("attn2.to_q",)),
    # FFN input (GEGLU / GELU projection: the norm feeds the Linear directly).
    FoldRule(_BASIC, "norm3", ("ff.net.0.proj",), when=_plain_ln),
    FoldRule(("TemporalBasicTransformerBlock",), "norm_in", ("ff_in.net.0.proj",)),
    # adaLN-zero with a Linear per block (CogVideoX): rows (shift, scale, gate) for the
    # video stream then the text stream; both streams go through the same layers.
    FoldRule(
        ("CogVideoXBlock",),
        "norm1.linear",
        _qkv("attn1"),
        "folded_adaln",
        chunks=6,
        pairs=((0, 1), (3, 4)),
    ),  # fmt: skip
    FoldRule(
        ("CogVideoXBlock",),
        "norm2.linear",
        ("ff.net.0.proj",),
        "folded_adaln",
        chunks=6,
        pairs=((0, 1), (3, 4)),
    ),  # fmt: skip
    FoldRule(
        ("CogVideoXTransformer3DModel",),
        "norm_out.linear",
        ("proj_out",),
        "folded_adaln",
        when=lambda b: b.norm_out.chunk_dim == 1,
        chunks=2,
        pairs=((0, 1),),
    ),  # fmt: skip
    # adaLN-single (Latte) and Wan: a per-block table (shift_msa, scale_msa, gate_msa,
    # shift_mlp, scale_mlp, gate_mlp) plus a modulation shared by every block.
    FoldRule(
        ("BasicTransformerBlock",),
        "scale_shift_table",
        _qkv("attn1"),
        "folded_adaln_shift",
        when=lambda b: _ada_single(b) and not b.only_cross_attention,
        chunks=6,
        pairs=((0, 1),),
    ),  # fmt: skip
    FoldRule(
        ("BasicTransformerBlock",),
        "scale_shift_table",
        ("ff.net.0.proj",),
        "folded_adaln_shift",
        when=_ada_single,
        chunks=6,
        pairs=((3, 4),),
    ),  # fmt: skip
    FoldRule(
        ("WanTransformerBlock",),
        "scale_shift_table",
        _qkv("attn1"),
        "folded_adaln_shift",
        chunks=6,
        pairs=((0, 1),),
    ),  # fmt: skip
    FoldRule(
        ("WanTransformerBlock",),
        "scale_shift_table",
        ("ffn.net.0.proj",),
        "folded_adaln_shift",
        chunks=6,
        pairs=((3, 4),),
    ),  # fmt: skip
    # The final norm: (shift, scale) from the model's table plus the shared embedding.
    FoldRule(
        ("LatteTransformer3DModel", "WanTransformer3DModel"),
        "scale_shift_table",
        ("proj_out",),
        "folded_adaln_shift",
        chunks=2,
        pairs=((0, 1),),
    ),  # fmt: skip
    # GEGLU / SwiGLU: the output Linear reads h ⊙ act(gate), h the first half of proj.
    FoldRule(("FeedForward",), "net.0.proj", ("net.2",), "folded_geglu_scale", when=_gated_ffn),
)

# Why a layer has no fold site, by (block class, layer suffix); first match wins.
_EXPLICIT_REASONS: tuple[tuple[str, str, str], ...] = (
    (
        "",
        "net.2",
        "an activation (GELU, or a GEGLU gate that cannot fold) between the norm and the layer",
    ),
    ("ResnetBlock2D", "", "SiLU between the GroupNorm and the conv"),
    ("TemporalResnetBlock", "", "SiLU between the GroupNorm and the conv"),
    ("TemporalConvLayer", "", "SiLU between the GroupNorm and the conv"),
)


@dataclass(frozen=True)
class FoldSite:
    """An exact fold site found in a model.

    Attributes:
        kind: one of ``KINDS`` except "explicit".
        source: qualified name of the norm, modulation Linear, modulation table
            (a parameter) or gated projection.
        layers: qualified names of the layers it feeds (one shared transform).
        chunks, pairs: see ``FoldRule`` (adaLN kinds only).
    """

    kind: str
    source: str
    layers: tuple[str, ...]
    chunks: int = 0
    pairs: tuple[tuple[int, int], ...] = ()

    @property
    def reason(self) -> str:
        if self.kind == "folded_adaln_shift":
            return (
                f"shift folded into the modulation table {self.source}; the scale stays "
                "explicit (the modulation Linear is shared by every block)"
            )
        if self.kind == "folded_geglu_scale":
            return (
                f"scale folded into the linear half of {self.source}; the shift stays "
                "explicit (the gate multiplies it)"
            )
        what = "affine" if self.kind == "folded_norm" else "modulation rows"
        return f"folded into the {what} of {self.source}"


@dataclass
class TransformRecord:
    """One transform placed on a layer or a group of layers.

    Attributes:
        kind: one of ``KINDS``.
        layers: the layers transformed (all with the same shift and scale).
        reason: why this kind (the fold source, or why none exists).
        shift: z (C,) float64.
        scale: s (C,) float64.
        folded: new values of other modules' parameters, by ``state_dict`` name.
        weights: layer -> W̃ = W·diag(s) in the layer's dtype.
        biases: layer -> b̃ = b + W·z where z is folded (a wrapper that subtracts a shift
            itself computes its own bias).
        input_shift: (C,) float64, the shift the wrapper still subtracts (z, or z/s after
            a scale fold), or None.
        input_scale: (C,) float64, the scale the wrapper still divides by, or None.
        replaced: the values ``folded`` overwrote, by ``state_dict`` name (set by
            ``apply_channel_transform``; ``restore_parameters`` writes them back).
    """

    kind: str
    layers: tuple[str, ...]
    reason: str
    shift: Tensor
    scale: Tensor
    folded: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)
    biases: dict[str, Tensor] = field(default_factory=dict)
    input_shift: Tensor | None = None
    input_scale: Tensor | None = None
    replaced: dict[str, Tensor] = field(default_factory=dict)

    @property
    def explicit(self) -> bool:
        """True when nothing folds (the wrapper computes the whole transform)."""
        return self.kind == "explicit"

    @property
    def has_input_transform(self) -> bool:
        """True when the wrapper computes some of the transform itself."""
        return self.input_shift is not None or self.input_scale is not None


# --------------------------------------------------------------------------- sites


def _has_affine(norm: nn.Module) -> bool:
    return (
        isinstance(norm, (nn.GroupNorm, nn.LayerNorm))
        and getattr(norm, "weight", None) is not None
        and getattr(norm, "bias", None) is not None
    )


def _consumer_ok(root: nn.Module, name: str) -> bool:
    """A leaf Linear/unpadded conv whose attention (if any) adds no norm of its own."""
    try:
        module = root.get_submodule(name)
    except AttributeError:
        return False
    if isinstance(module, CONV_TYPES):
        if any(module._reversed_padding_repeated_twice):
            return False
    elif not isinstance(module, nn.Linear):
        return False
    parent = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
    return getattr(parent, "group_norm", None) is None and (
        getattr(parent, "spatial_norm", None) is None
    )


def _channels(module: nn.Module) -> int:
    """Input channels of a Linear / Conv layer."""
    groups = module.groups if isinstance(module, CONV_TYPES) else 1
    return module.weight.shape[1] * groups


def _source_ok(root: nn.Module, rule: FoldRule, name: str, channels: int) -> bool:
    """The source exists and has the shape the rule's fold needs for ``channels`` inputs."""
    if rule.kind in _TABLE_KINDS:
        try:
            table = root.get_parameter(name)
        except AttributeError:
            return False
        return table.shape[-1] == channels and table.numel() == rule.chunks * channels
    try:
        source = root.get_submodule(name)
    except AttributeError:
        return False
    if rule.kind == "folded_norm":
        return _has_affine(source) and source.weight.numel() == channels
    if rule.kind == "folded_geglu_scale":
        return isinstance(source, nn.Linear) and source.out_features == 2 * channels
    return (
        isinstance(source, nn.Linear)
        and source.bias is not None
        and source.out_features == rule.chunks * channels
    )


def fold_sites(denoiser: nn.Module) -> dict[str, FoldSite]:
    """Every exact fold site of a denoiser, by the layers it feeds.

    Args:
        denoiser: the (unwrapped) denoiser.

    Returns:
        layer name -> its FoldSite (the layers of one site share the same object).
    """
    sites: dict[str, FoldSite] = {}
    for block_name, block in denoiser.named_modules():
        cls = type(block).__name__
        prefix = f"{block_name}." if block_name else ""
        for rule in FOLD_TABLE:
            if cls not in rule.blocks or not rule.when(block):
                continue
            source = prefix + rule.source
            layers = tuple(prefix + layer for layer in rule.layers)
            if not all(_consumer_ok(denoiser, layer) for layer in layers):
                continue
            channels = {_channels(denoiser.get_submodule(layer)) for layer in layers}
            if len(channels) != 1 or not _source_ok(denoiser, rule, source, channels.pop()):
                continue
            if any(layer in sites for layer in layers):
                continue
            site = FoldSite(rule.kind, source, layers, rule.chunks, rule.pairs)
            sites.update(dict.fromkeys(layers, site))
    return sites


def fold_order(sites: dict[str, FoldSite]) -> list[FoldSite]:
    """The distinct sites, each before any site that feeds its source.

    A site whose source is a layer another site feeds (a GEGLU projection after a norm)
    must fold first: that layer is then transformed with its rewritten rows. Otherwise
    sites keep their order in ``sites``.

    Args:
        sites: ``fold_sites(denoiser)`` (or a subset).

    Returns:
        The sites in a valid folding order.
    """
    pending = list(dict.fromkeys(sites.values()))
    ordered: list[FoldSite] = []
    while pending:
        sources = {site.source for site in pending}
        # A site may go when none of its layers is the source of a site still to go.
        ready = [site for site in pending if not sources & set(site.layers)]
        if not ready:  # a cycle cannot occur in a feed-forward model; keep the order
            ready = pending[:1]
        ordered += ready
        pending = [site for site in pending if site not in ready]
    return ordered


def explicit_reason(denoiser: nn.Module, layer: str) -> str:
    """Why a layer without a fold site keeps an explicit transform (one line)."""
    parts = layer.split(".")
    ancestors = [type(denoiser.get_submodule(".".join(parts[:i]))).__name__ for i in
                 range(len(parts) - 1, 0, -1)]  # fmt: skip
    for block, suffix, reason in _EXPLICIT_REASONS:
        if (not block or block in ancestors) and layer.endswith(suffix):
            return reason
    return "no norm feeds the layer directly"


# --------------------------------------------------------------------------- transforms


def _input_axis_view(scale: Tensor, weight: Tensor, module: nn.Module) -> Tensor:
    """The (C,) per-input-channel values broadcast against a weight's input axis."""
    groups = module.groups if isinstance(module, CONV_TYPES) else 1
    per_group = weight.shape[1]
    # Output o of conv group g reads input channels g*per_group ... (g+1)*per_group − 1.
    table = scale.reshape(groups, per_group).repeat_interleave(weight.shape[0] // groups, 0)
    return table.reshape(weight.shape[0], per_group, *([1] * (weight.ndim - 2)))


def transformed_weight(module: nn.Module, scale: Tensor, weight: Tensor | None = None) -> Tensor:
    """W̃ = W·diag(s) along the input axis.

    Args:
        module: a Linear or Conv layer.
        scale: (C,) s.
        weight: a weight to use instead of ``module.weight``.

    Returns:
        W̃ like the weight, computed in float64 and cast back.
    """
    w = (module.weight if weight is None else weight).detach()
    w64 = w.to(torch.float64)
    return (w64 * _input_axis_view(scale.to(w64), w64, module)).to(w.dtype)


def transformed_bias(
    module: nn.Module,
    shift: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """b̃ = b + W·z (summed over a conv's kernel), for an unpadded layer.

    Args:
        module: a Linear or Conv layer.
        shift: (C,) z.
        weight, bias: values to use instead of the module's.

    Returns:
        (O,) in the layer's dtype.
    """
    w = (module.weight if weight is None else weight).detach().to(torch.float64)
    bias = module.bias if bias is None else bias
    base = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    if bias is not None:
        base = bias.detach().to(torch.float64)
    view = _input_axis_view(shift.to(w), w, module)
    return (base + (w * view).reshape(w.shape[0], -1).sum(1)).to(module.weight.dtype)


def _check_transform(shift: Tensor, scale: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    z = torch.as_tensor(shift, dtype=torch.float64).reshape(-1).cpu()
    s = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).cpu()
    if z.numel() != channels or s.numel() != channels:
        raise UserError(
            f"transform needs ({channels},) shift and scale, got {z.numel()}, {s.numel()}"
        )
    if not bool(torch.isfinite(z).all()) or not bool((s > 0).all() & torch.isfinite(s).all()):
        raise UserError("transform needs finite shifts and finite positive scales")
    return z, s


def _param(module: nn.Module, name: str, attr: str, params: dict[str, Tensor]) -> Tensor | None:
    """A parameter of ``module`` (named ``name``), or its value in ``params`` if there."""
    value = params.get(f"{name}.{attr}")
    return getattr(module, attr) if value is None else value


def _folded_source(
    denoiser: nn.Module, site: FoldSite, z: Tensor, s: Tensor, params: dict[str, Tensor]
) -> dict[str, Tensor]:
    """New parameters of the site's source (by ``state_dict`` name), computed in float64.

    Args:
        denoiser: the denoiser.
        site: the fold site.
        z, s: (C,) the transform.
        params: values already rewritten by other folds, used instead of the model's.
    """
    if site.kind in _TABLE_KINDS:
        current = params.get(site.source)
        table = denoiser.get_parameter(site.source) if current is None else current
        rows = table.detach().to(torch.float64).reshape(site.chunks, -1).clone()
        for shift_chunk, _ in site.pairs:
            rows[shift_chunk] -= z.to(rows.device)
        return {site.source: rows.reshape(table.shape).to(table.dtype)}
    source = denoiser.get_submodule(site.source)
    dtype = source.weight.dtype
    weight = _param(source, site.source, "weight", params).detach().to(torch.float64)
    bias = _param(source, site.source, "bias", params)
    bias = None if bias is None else bias.detach().to(torch.float64)
    z, s = z.to(weight.device), s.to(weight.device)
    if site.kind == "folded_norm":
        new_weight, new_bias = weight / s, (bias - z) / s
    elif site.kind == "folded_geglu_scale":
        # proj(x).chunk(2) = (h, gate): the first C rows compute h.
        width = weight.shape[0] // 2
        new_weight = weight.clone()
        new_weight[:width] = weight[:width] / s[:, None]
        new_bias = None
        if bias is not None:
            new_bias = bias.clone()
            new_bias[:width] = bias[:width] / s
    else:
        width = weight.shape[0] // site.chunks
        new_weight, new_bias = weight.clone(), bias.clone()
        for shift_chunk, scale_chunk in site.pairs:
            rows = slice(shift_chunk * width, (shift_chunk + 1) * width)
            new_weight[rows] = weight[rows] / s[:, None]
            new_bias[rows] = (bias[rows] - z) / s
            rows = slice(scale_chunk * width, (scale_chunk + 1) * width)
            new_weight[rows] = weight[rows] / s[:, None]
            new_bias[rows] = (1.0 + bias[rows]) / s - 1.0
    out = {f"{site.source}.weight": new_weight.to(dtype)}
    if new_bias is not None:
        out[f"{site.source}.bias"] = new_bias.to(dtype)
    return out


def _residual(kind: str, z: Tensor, s: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(shift, scale) the wrapper still applies after a fold of ``kind`` (None: nothing).

    After a scale fold the input is X/s, and (X − z)/s = X/s − z/s; after a shift fold it
    is X − z. Identity parts are left out, so a fold that absorbs all there is to absorb
    (s = 1 with a shift fold, z = 0 with a scale fold) leaves the wrapper plain.
    """
    if kind == "explicit":
        return z, s
    if kind == "folded_adaln_shift":
        return None, (None if bool((s == 1).all()) else s)
    if kind == "folded_geglu_scale":
        return (None if bool((z == 0).all()) else z / s), None
    return None, None


def plan_transform(
    denoiser: nn.Module,
    layers: str | Sequence[str],
    shift: Tensor,
    scale: Tensor,
    *,
    fold: bool = True,
    sites: dict[str, FoldSite] | None = None,
    params: dict[str, Tensor] | None = None,
) -> TransformRecord:
    """Computes a transform of a layer or group without changing the model.

    A single layer that belongs to a multi-layer fold site (q of a q/k/v site) brings
    the whole site along; a group is folded only when it is exactly one site's layers,
    and is otherwise transformed explicitly, each layer on its own wrapper.

    Args:
        denoiser: the unwrapped denoiser.
        layers: a layer name or a group of names fed by the same input.
        shift: z (C,).
        scale: s (C,), positive.
        fold: False forces an explicit transform.
        sites: ``fold_sites(denoiser)``, to reuse.
        params: parameter values already rewritten by other folds (``state_dict`` name ->
            tensor), used instead of the model's: a modulation Linear or GEGLU projection
            that is itself transformed after a fold into its rows, a table two sites
            fold into.

    Returns:
        The TransformRecord (parameters in the model's dtype, on its device).
    """
    names = (layers,) if isinstance(layers, str) else tuple(layers)
    modules = leaf_layers(denoiser, names)
    missing = [n for n in names if n not in modules]
    if missing or not names:
        raise UserError(f"no leaf Linear/Conv layer named {missing or names}")
    sites = fold_sites(denoiser) if sites is None and fold else (sites or {})
    site = sites.get(names[0]) if fold else None
    if site is not None and (len(names) == 1 or set(names) == set(site.layers)):
        names, kind, reason = site.layers, site.kind, site.reason
        modules = leaf_layers(denoiser, names)
    else:
        kind = "explicit"
        reason = (
            "fold disabled"
            if not fold
            else "its fold site has other layers not in the group"
            if site is not None
            else explicit_reason(denoiser, names[0])
        )
    z, s = _check_transform(shift, scale, _channels(modules[names[0]]))
    params = params or {}
    input_shift, input_scale = _residual(kind, z, s)
    partial = kind in ("folded_adaln_shift", "folded_geglu_scale")
    if partial and input_shift is None and input_scale is None:
        # A shift alone into a table, a scale alone into a projection: it folds whole.
        reason = f"folded whole into {site.source} (the part it cannot absorb is identity)"
    record = TransformRecord(kind, names, reason, z, s, input_shift=input_shift,
                             input_scale=input_scale)  # fmt: skip
    for name in names:
        module = modules[name]
        device = module.weight.device
        weight = _param(module, name, "weight", params)
        record.weights[name] = transformed_weight(module, s.to(device), weight)
        if input_shift is None and kind != "explicit":
            # z is folded upstream (or zero): b̃ = b + W·z replaces the bias. A wrapper
            # that subtracts a shift itself computes its bias from its own weight.
            bias = _param(module, name, "bias", params)
            record.biases[name] = transformed_bias(module, z.to(device), weight, bias)
    if kind != "explicit":
        record.folded = _folded_source(denoiser, site, z, s, params)
    return record


@torch.no_grad()
def write_folded(denoiser: nn.Module, folded: dict[str, Tensor]) -> dict[str, Tensor]:
    """Writes folded parameters (by ``state_dict`` name) into the model in place.

    Returns:
        The values they replaced (copies), by the same names.
    """
    state = denoiser.state_dict(keep_vars=True)
    replaced = {}
    for name, value in folded.items():
        if name not in state:
            raise UserError(f"folded parameter {name!r} is not in the model")
        replaced[name] = state[name].detach().clone()
        state[name].data.copy_(value.to(state[name]))
    return replaced


@torch.no_grad()
def restore_parameters(denoiser: nn.Module, originals: dict[str, Tensor]) -> None:
    """Writes original parameter values (by ``state_dict`` name) back, bit for bit."""
    state = denoiser.state_dict(keep_vars=True)
    for name, value in originals.items():
        if name not in state:
            raise UserError(f"parameter {name!r} to restore is not in the model")
        state[name].data.copy_(value)


def transform_wrapper(module: nn.Module, record: TransformRecord, layer: str) -> QuantWrapper:
    """A float wrapper (no quantizers) computing ``layer`` under ``record``'s transform."""
    wrapper = QuantWrapper(
        module, None, None, weight=record.weights[layer], bias=record.biases.get(layer)
    )
    if record.has_input_transform:
        wrapper.set_input_transform(record.input_shift, record.input_scale)
    return wrapper


def apply_channel_transform(
    loaded: LoadedModel,
    layer_or_group: str | Sequence[str],
    shift: Tensor,
    scale: Tensor,
    *,
    fold: bool = True,
) -> TransformRecord:
    """Transforms a layer (or group) of the model in place, without quantizing.

    Transform sites in ``fold_order`` and before the layers their sources are (a source
    already wrapped is no longer found: the layers it feeds are then transformed
    explicitly). Folded parameters are written into the model (the values they replace
    are kept in ``record.replaced``); every transformed layer becomes a ``QuantWrapper``
    without quantizers holding W̃ (and b̃, or what is left of the input transform), so
    the model computes the same function (up to rounding). ``undo_channel_transforms``
    takes it back.

    Args:
        loaded: the model.
        layer_or_group: see ``plan_transform``.
        shift: z (C,).
        scale: s (C,).
        fold: False forces an explicit transform.

    Returns:
        The TransformRecord.
    """
    denoiser = loaded.layer_root
    record = plan_transform(denoiser, layer_or_group, shift, scale, fold=fold)
    record.replaced = write_folded(denoiser, record.folded)
    for name in record.layers:
        module = denoiser.get_submodule(name)
        swap_module(denoiser, name, transform_wrapper(module, record, name))
    return record


def undo_channel_transforms(loaded: LoadedModel, records: Sequence[TransformRecord]) -> None:
    """Takes back ``apply_channel_transform`` calls: the original layers and parameters.

    Args:
        loaded: the model.
        records: the records of the calls, in the order they were made.
    """
    denoiser = loaded.layer_root
    for record in reversed(records):
        for name in record.layers:
            wrapper = denoiser.get_submodule(name)
            if isinstance(wrapper, QuantWrapper):
                swap_module(denoiser, name, wrapper.module)
        restore_parameters(denoiser, record.replaced)
