"""Split quantization of skip-connection concatenations (Q-Diffusion's shortcut splitting).

In a UNet up block each resnet reads ``cat([h, skip], dim=1)``: h (C_h channels) from the
layer below and the skip (the rest) from the matching down block. The two parts have
very different ranges, so one per-tensor range wastes levels on the narrower part. With
``QuantConfig(split_skip=True)`` the leaf layers reading such a concatenation — the
resnet's ``conv_shortcut`` (directly) and its ``conv1`` (after GroupNorm and SiLU, which
keep the channel order) — quantize their inputs with one quantizer per part: channels
[:C_h] and [C_h:] each get their own (scale, zero point), calibrated on the statistics of
their own channels only (``uniform_range(..., channels=part)``: the part's per-channel
extrema for "minmax", the Lp clipping search on the part's reservoir columns for "mse").

Weights are split too, as Q-Diffusion does: its ``QuantModule`` with a split quantizes
``weight[:, :split]`` and ``weight[:, split:]`` with two weight quantizers (each per
output channel), so here each part of the input channels gets its own per-output-channel
symmetric scale, (2, O) in all. Q-Diffusion splits only the shortcut layer; ``conv1``
reads the same two parts (normalised per group), so it is split as well.

Where the split applies: ``SKIP_RESNETS`` names, per denoiser class, the resnet that reads
each up-block concatenation; C_h follows diffusers' construction of the up blocks from
``config.block_out_channels`` (``skip_splits`` lists the layers and checks the modules). Denoisers without skip concatenations (DiTs)
map to None: ``split_skip`` then changes nothing (``QuantRecord.summary`` says so).
Granularities: per tensor, per timestep group ((2, G) qparams) and dynamic per token
(each token's range taken within each part). Layers with an explicit input transform
(SCRI, OS+, SmoothQuant) and the histogram-based ``percentile`` rule are not split (the
record's ``info["split_skipped"]`` says why). Each part of a split input has at most 2^b
distinct values, so the whole input has up to 2^(b+1): one b-bit code per part.

Records: ``builder = "split"``, ``info["split"] = C_h``, ``act_scale`` /
``act_zero_point`` of shape (2,) (static) or (2, G) (timestep groups), ``weight_scale``
(2, O). They save and reload through the ordinary record machinery.

This module knows where the splits are (``skip_splits``) and holds the split modules;
calibration is ``methods.base.set_split_act``, and ``builders.split_builder`` builds the
wrapper of a split record.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qvd_bench.errors import UserError
from qvd_bench.numerics.grid import check_bits
from qvd_bench.quant.modules import CONV_TYPES, ActQuantizer, QuantWrapper
from qvd_bench.quant.observers import weight_qparams
from qvd_bench.quant.primitives import fake_quant_affine

# Per denoiser class: the module path of the resnet (a diffusers ResnetBlock2D) that reads
# the skip concatenation of resnet ``index`` of up block ``block``; None when the class
# has no skip concatenations.
SKIP_RESNETS: dict[str, str | None] = {
    "UNet3DConditionModel": "up_blocks.{block}.resnets.{index}",
    "I2VGenXLUNet": "up_blocks.{block}.resnets.{index}",
    "UNetMotionModel": "up_blocks.{block}.resnets.{index}",
    # SpatioTemporalResBlock hands its input to a 2-D resnet, then to a temporal one.
    "UNetSpatioTemporalConditionModel": "up_blocks.{block}.resnets.{index}.spatial_res_block",
    "LatteTransformer3DModel": None,
    "CogVideoXTransformer3DModel": None,
    "WanTransformer3DModel": None,
}
# The leaf layers of such a resnet that read the concatenation.
SPLIT_LAYERS = ("conv1", "conv_shortcut")
# Clipping rules whose ranges can be restricted to a part's channels.
SPLIT_RULES = ("minmax", "mse")


def h_channels(block_out_channels: Sequence[int], block: int, index: int) -> int:
    """C_h, the channels of h in ``cat([h, skip])`` read by resnet ``index`` of up block
    ``block``, as diffusers builds the up blocks: resnet 0 reads the previous up block's
    output (the mid block's for block 0), the others the output of the resnet before.

    Args:
        block_out_channels: the denoiser's ``config.block_out_channels`` (down order).
        block: the up block (0 = deepest).
        index: the resnet within it.
    """
    up_channels = list(reversed(block_out_channels))
    if index > 0:
        return int(up_channels[block])
    return int(up_channels[max(block - 1, 0)])


def skip_splits(denoiser: nn.Module) -> dict[str, int]:
    """Leaf layers reading a skip concatenation, and C_h of each.

    Args:
        denoiser: a denoiser of a class in ``SKIP_RESNETS``.

    Returns:
        Qualified layer name -> C_h (input channels [:C_h] are h, [C_h:] the skip), in
        module order; empty for classes without skip concatenations.

    Raises:
        UserError: a denoiser class missing from the table, or a model whose up blocks do
            not have the layout the table describes.
    """
    class_name = type(denoiser).__name__
    if class_name not in SKIP_RESNETS:
        raise UserError(
            f"split quantization does not know the skip concatenations of {class_name} "
            f"(known: {', '.join(sorted(SKIP_RESNETS))})"
        )
    template = SKIP_RESNETS[class_name]
    if template is None:
        return {}
    block_out_channels = denoiser.config.block_out_channels
    splits: dict[str, int] = {}
    for block, up_block in enumerate(denoiser.up_blocks):
        for index in range(len(up_block.resnets)):
            path = template.format(block=block, index=index)
            split = h_channels(block_out_channels, block, index)
            for leaf in SPLIT_LAYERS:
                splits[f"{path}.{leaf}"] = split
            _check_resnet(denoiser.get_submodule(path), path, split)
    order = {name: i for i, (name, _) in enumerate(denoiser.named_modules())}
    return dict(sorted(splits.items(), key=lambda item: order[item[0]]))


def _check_resnet(resnet: nn.Module, path: str, split: int) -> None:
    """The resnet reads its input through norm1 + SiLU into conv1 and through a shortcut
    conv, and C_h leaves a non-empty skip part (looking through quantization wrappers)."""
    convs = [getattr(resnet, leaf, None) for leaf in SPLIT_LAYERS]
    convs = [conv.original if isinstance(conv, QuantWrapper) else conv for conv in convs]
    ok = (
        isinstance(getattr(resnet, "norm1", None), nn.GroupNorm)
        and all(isinstance(conv, CONV_TYPES) and conv.groups == 1 for conv in convs)
        and convs[0].in_channels == convs[1].in_channels > split > 0
    )
    if not ok:
        raise UserError(
            f"{path} is not a resnet reading a skip concatenation of {split} + more channels "
            "through norm1/conv1 and conv_shortcut: the model does not have the up-block "
            "layout split quantization expects"
        )


def split_parts(split: int) -> tuple[slice, slice]:
    """The input channels of h ([:C_h]) and of the skip ([C_h:])."""
    return slice(0, split), slice(split, None)


# --------------------------------------------------------------------------- modules


class SplitActQuant(ActQuantizer):
    """One activation quantizer per part of the channels: [:split] and [split:].

    Args:
        parts: the two quantizers (``StaticActQuant``, ``GroupActQuant`` or
            ``DynamicTokenActQuant``), for channels [:split] and [split:].
        split: C_h.

    Each part of the output has at most 2^b distinct values (per token when dynamic).
    """

    def __init__(self, parts: Sequence[ActQuantizer], split: int):
        super().__init__()
        if len(parts) != 2:
            raise UserError(f"a split input needs two part quantizers, got {len(parts)}")
        self.parts = nn.ModuleList(parts)
        self.split = int(split)
        self.bits = parts[0].bits

    def forward(self, x: Tensor, channel_dim: int = -1) -> Tensor:
        """x̂ like x (any shape, channels on ``channel_dim``), each part quantized alone."""
        channels = x.shape[channel_dim]
        head = x.narrow(channel_dim, 0, self.split)
        tail = x.narrow(channel_dim, self.split, channels - self.split)
        quantized = [quant(part, channel_dim) for quant, part in zip(self.parts, (head, tail))]
        return torch.cat(quantized, dim=channel_dim)

    def extra_repr(self) -> str:
        return f"split={self.split}"


class SplitQuantWrapper(QuantWrapper):
    """A ``QuantWrapper`` whose input channels [:split] and [split:] are quantized apart.

    Weights: the input-channel slices ``weight[:, :split]`` and ``weight[:, split:]`` are
    fake-quantized separately, each per output channel and symmetric (Q-Diffusion's split
    weight quantizers). Inputs: ``SplitActQuant``. ``enabled = False`` computes the
    original layer.

    Args:
        module: the Linear / Conv layer (``groups == 1``).
        split: C_h, with 0 < C_h < input channels.
        weight_bits: bits of the weight quantizers; None keeps the float weight.
        act: the input quantizer (usually a ``SplitActQuant``), or None.
        weight_scale: (2, O) per-part per-output-channel scales; min-max when None.
    """

    def __init__(
        self,
        module: nn.Module,
        split: int,
        weight_bits: int | None,
        act: ActQuantizer | None,
        *,
        weight_scale: Tensor | None = None,
    ):
        super().__init__(module, None, act)
        weight = module.weight.detach()
        if getattr(module, "groups", 1) != 1 or not 0 < split < weight.shape[1]:
            raise UserError(
                f"cannot split a layer of {weight.shape[1]} input channels "
                f"(groups {getattr(module, 'groups', 1)}) at channel {split}"
            )
        self.split = int(split)
        if weight_bits is None:
            return
        self.weight_bits = check_bits(weight_bits)
        parts = split_parts(self.split)
        if weight_scale is None:
            weight_scale = torch.stack(
                [weight_qparams(weight[:, p], weight_bits)[0] for p in parts]
            )
        scale = torch.as_tensor(weight_scale, dtype=torch.float32).to(weight.device)
        if scale.shape != (2, weight.shape[0]):
            raise UserError(
                f"split weight scales must be (2, {weight.shape[0]}), got {tuple(scale.shape)}"
            )
        zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
        quantized = [
            fake_quant_affine(weight[:, p], s, zero, self.weight_bits, 0, symmetric=True)
            for p, s in zip(parts, scale)
        ]
        self.qweight = torch.cat(quantized, dim=1)
        self.weight_scale = scale

    def extra_repr(self) -> str:
        return f"split={self.split}, {super().extra_repr()}"
