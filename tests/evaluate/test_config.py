"""What to evaluate: EvalConfig's checks and the bit-width specs."""

import pytest

from qvd_bench.errors import UserError
from qvd_bench.evaluate.config import EvalConfig, normalise_bits_specs, split_bits_spec
from qvd_bench.evaluate.generate import GenerationSettings


def _config(**overrides):
    values = dict(
        prompts=("a cat", "a dog"),
        methods=("fp", "minmax"),
        bits=("W8A8",),
        settings=GenerationSettings(steps=2, frames=2, height=16, width=16),
    )
    values.update(overrides)
    return EvalConfig(**values)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prompts": ()}, "no prompts"),
        ({"metrics": ("fdv",)}, "unknown metric 'fdv'; did you mean 'fvd'"),
        ({"methods": ("minmx",)}, "did you mean 'minmax'"),
        ({"bits": ("W4",)}, "W4A8"),
        ({"reference": "/no/such/dir"}, "reference must be"),
        ({"weight_seeds": (0, 1), "stats": "x"}, "stats describes one model"),
        ({"weights": {"fvd": "/no/such.pt"}}, r"weights\['fvd'\]: /no/such.pt does not exist"),
    ],
)
def test_bad_input_is_a_one_line_user_error(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        _config(**overrides)
    assert "\n" not in str(info.value)


def test_bits_specs_are_normalised_and_mixed_ones_recognised():
    assert normalise_bits_specs(["w4a8", "W4A8", "w8a6-MIXED"]) == ("W4A8", "W8A6-mixed")
    assert split_bits_spec("W8A6-mixed") == (8, 6, True)
    assert split_bits_spec("w4a8") == (4, 8, False)
    with pytest.raises(UserError):
        normalise_bits_specs([])
