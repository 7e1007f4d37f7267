"""One ``Family`` per diffusers denoiser class, registered by class name.

``FAMILIES`` maps a denoiser class name ("UNet3DConditionModel") to its Family;
``family_by_name`` finds one by its short name ("unet3d").
"""

from __future__ import annotations

from qvd_bench.models.families.allegro import AllegroFamily
from qvd_bench.models.families.cogvideox import CogVideoXFamily
from qvd_bench.models.families.hunyuan_video import HunyuanVideoFamily
from qvd_bench.models.families.hunyuan_video15 import HunyuanVideo15Family
from qvd_bench.models.families.i2vgenxl import I2VGenXLFamily
from qvd_bench.models.families.latte import LatteFamily
from qvd_bench.models.families.ltx import LTXVideoFamily
from qvd_bench.models.families.ltx2 import LTX2Family
from qvd_bench.models.families.mochi import MochiFamily
from qvd_bench.models.families.motion import MotionFamily
from qvd_bench.models.families.skyreels_v2 import SkyReelsV2Family
from qvd_bench.models.families.svd import SVDFamily
from qvd_bench.models.families.unet3d import UNet3DFamily
from qvd_bench.models.families.wan import WanFamily
from qvd_bench.models.family import Family
from qvd_bench.registry import Registry

FAMILIES: Registry[Family] = Registry("denoiser class")
_FAMILIES_BY_NAME: Registry[Family] = Registry("model family")

for _family_class in (
    UNet3DFamily,
    MotionFamily,
    SVDFamily,
    I2VGenXLFamily,
    LatteFamily,
    CogVideoXFamily,
    WanFamily,
    LTXVideoFamily,
    HunyuanVideoFamily,
    MochiFamily,
    LTX2Family,
    HunyuanVideo15Family,
    AllegroFamily,
    SkyReelsV2Family,
):
    _family = _family_class()
    FAMILIES.register(_family.denoiser_class, _family)
    _FAMILIES_BY_NAME.register(_family.name, _family)


def family_by_name(name: str) -> Family:
    """The family with this short name ("unet3d", "wan", ...); UserError if unknown."""
    return _FAMILIES_BY_NAME.get(name)


def family_names() -> list[str]:
    """Short names of all families, in registration order."""
    return list(_FAMILIES_BY_NAME)
