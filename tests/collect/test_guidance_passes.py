"""Guidance passes beyond CFG (LTX-2's spatio-temporal and modality-isolation passes, a
diffusers guider's perturbed predictions) are stored under branches of their own."""

from __future__ import annotations

import pytest
import torch

from qvd_bench.collect.hooks import StatsCollector, channel_last_rows
from qvd_bench.errors import UserError
from qvd_bench.models.families import family_by_name
from qvd_bench.models.families.ltx import pack_tokens
from qvd_bench.models.family import LoadedModel
from qvd_bench.models.sampling import ALL_BRANCHES, CallTracker
from tests.collect.test_hooks import hooked
from tests.references import assert_channels_match

FRAMES, SIZE = 2, 4
LAYER = "transformer_blocks.0.ff.net.0.proj"  # after the perturbed attentions


def tiny_ltx2() -> LoadedModel:
    family = family_by_name("ltx2")
    torch.manual_seed(0)
    denoiser = family.build(family.tiny_config()).eval()
    return LoadedModel(name="tiny-ltx2", family=family, denoiser=denoiser)


def ltx2_step(denoiser, context_calls):
    """One LTX2Pipeline denoising step: each (cache_context, batch copies, pass kwargs)
    runs one denoiser call on the prompt's states, as the pipeline's loop does."""
    generator = torch.Generator().manual_seed(1)
    config = denoiser.config
    latents = torch.randn(1, config.in_channels, FRAMES, SIZE, SIZE, generator=generator)
    audio = torch.randn(1, 4, config.audio_in_channels, generator=generator)
    cond = torch.randn(1, 6, config.caption_channels, generator=generator)
    uncond = torch.randn(1, 6, config.caption_channels, generator=generator)
    tokens = pack_tokens(latents, config.patch_size, config.patch_size_t)
    for context, copies, extra in context_calls:
        states = torch.cat([uncond, cond]) if copies == 2 else cond
        with denoiser.cache_context(context), torch.no_grad():
            denoiser(
                hidden_states=tokens.repeat(copies, 1, 1),
                audio_hidden_states=audio.repeat(copies, 1, 1),
                encoder_hidden_states=states,
                audio_encoder_hidden_states=states,
                timestep=torch.full((copies,), 600.0),
                sigma=torch.full((copies,), 600.0),
                encoder_attention_mask=torch.ones(states.shape[:2]),
                audio_encoder_attention_mask=torch.ones(states.shape[:2]),
                num_frames=FRAMES,
                height=SIZE // config.patch_size,
                width=SIZE // config.patch_size,
                audio_num_frames=audio.shape[1],
                return_dict=False,
                **extra,
            )


# LTX2Pipeline's default step: CFG, then STG (blocks skipped), then modality isolation.
LTX2_STEP = [
    ("cond_uncond", 2, {}),
    ("uncond_stg", 1, {"spatio_temporal_guidance_blocks": [0]}),
    ("uncond_modality", 1, {"isolate_modalities": True}),
]


def test_ltx2_guidance_passes_are_stored_under_their_own_branches():
    loaded = tiny_ltx2()
    denoiser = loaded.denoiser
    layers, infos = hooked(loaded)
    raw: list[torch.Tensor] = []
    grab = layers[LAYER].register_forward_pre_hook(lambda m, args: raw.append(args[0].clone()))
    tracker = CallTracker(denoiser).attach()
    collector = StatsCollector(layers, infos, tracker, reservoir_capacity=1000)
    try:
        with collector, tracker.batch([0]):
            ltx2_step(denoiser, LTX2_STEP)
    finally:
        grab.remove()
        tracker.detach()
    assert {key[3] for key in collector.moments} == {"uncond", "cond", "cond_stg", "cond_modality"}
    # Each branch holds exactly the raw inputs of its own pass (float64 reference).
    uncond, cond = raw[0].chunk(2)
    channel_dim = infos[LAYER].channel_dim
    for branch, x in (
        ("uncond", uncond),
        ("cond", cond),
        ("cond_stg", raw[1]),
        ("cond_modality", raw[2]),
    ):
        columns = channel_last_rows(x, 1, channel_dim).reshape(-1, x.shape[channel_dim])
        assert_channels_match(
            collector.moments[("input", LAYER, 600.0, branch)], columns.double().numpy()
        )
    # The passes really are different computations of the same layer input.
    assert not torch.equal(raw[1], cond) and not torch.equal(raw[2], cond)
    codes = set(collector.reservoirs[LAYER].branches.tolist())
    assert codes == {ALL_BRANCHES.index(b) for b in ("uncond", "cond", "cond_stg", "cond_modality")}


@pytest.mark.parametrize(
    "context, branch",
    [("pred_cond_stg", "cond_stg"), ("pred_cond_skip", "cond_skip"), ("pred_cond_seg", "cond_seg")],
)
def test_a_guiders_perturbed_prediction_is_a_branch(context, branch):
    loaded = tiny_ltx2()
    tracker = CallTracker(loaded.denoiser).attach()
    seen = []
    handle = loaded.denoiser.register_forward_hook(lambda *_: seen.append(tracker.current))
    try:
        with tracker.batch([0]):
            ltx2_step(loaded.denoiser, [(context, 1, {})])
    finally:
        handle.remove()
        tracker.detach()
    assert seen[0].branches == (branch,)


def test_every_cache_context_name_in_diffusers_pipelines_is_keyed():
    """Each literal ``cache_context("...")`` name in the installed diffusers pipelines maps
    to a branch (guider-named calls are checked above)."""
    import pathlib
    import re

    import diffusers

    from qvd_bench.models.sampling import CACHE_CONTEXT_BRANCHES

    root = pathlib.Path(diffusers.__file__).parent / "pipelines"
    names = set()
    for path in root.rglob("*.py"):
        names |= set(re.findall(r'cache_context\("([^"]+)"', path.read_text(encoding="utf-8")))
    assert names and names <= set(CACHE_CONTEXT_BRANCHES), names - set(CACHE_CONTEXT_BRANCHES)


def test_an_unknown_cache_context_says_how_to_turn_the_pass_off():
    loaded = tiny_ltx2()
    tracker = CallTracker(loaded.denoiser).attach()
    try:
        with tracker.batch([0]), pytest.raises(UserError, match="pipeline_kwargs"):
            ltx2_step(loaded.denoiser, [("uncond_perturbed", 1, {})])
    finally:
        tracker.detach()
