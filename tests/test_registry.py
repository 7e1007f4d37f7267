import pytest

from qvd_bench.errors import UserError
from qvd_bench.registry import Registry


def test_get_returns_registered_object():
    registry = Registry("model")
    registry.register("tiny-unet3d", 1)
    assert registry.get("tiny-unet3d") == 1
    assert "tiny-unet3d" in registry and len(registry) == 1


def test_unknown_name_suggests_close_matches():
    registry = Registry("model")
    for name in ("tiny-unet3d", "tiny-svd", "tiny-wan"):
        registry.register(name, name)
    with pytest.raises(UserError, match=r"unknown model 'tiny-unet'; did you mean 'tiny-unet3d'"):
        registry.get("tiny-unet")


def test_unknown_name_without_close_match_lists_known():
    registry = Registry("method")
    registry.register("minmax", 1)
    with pytest.raises(UserError, match=r"known: minmax") as info:
        registry.get("zzzzzz")
    assert "did you mean" not in str(info.value)


def test_duplicate_registration_is_a_bug():
    registry = Registry("model")
    registry.register("a", 1)
    with pytest.raises(ValueError):
        registry.register("a", 2)
