import pytest

from qvd_bench.config import SCHEMA_VERSION, CollectConfig
from qvd_bench.errors import UserError


def test_round_trip_through_dict():
    config = CollectConfig(prompts=("a cat", "a dog"), steps=3, roles=("ffn",), include=("up",))
    data = config.to_dict()
    assert data["schema_version"] == SCHEMA_VERSION
    assert CollectConfig.from_dict(data) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be at least 1"),
        ({"prompts": ()}, "no prompts"),
        ({"frames": 0}, "frames must be at least 1"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"sampler": "ddpm"}, "sampler must be"),
    ],
)
def test_invalid_values_are_user_errors(kwargs, message):
    base = {"prompts": ("a cat",)}
    with pytest.raises(UserError, match=message):
        CollectConfig(**{**base, **kwargs})


def test_foreign_schema_version_is_rejected():
    data = CollectConfig(prompts=("a",)).to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(UserError, match="schema version"):
        CollectConfig.from_dict(data)
