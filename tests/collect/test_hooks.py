"""Layer hooks: CFG splitting, keys, untracked calls, temporal-feature probes."""

import numpy as np
import pytest
import torch
from torch import nn

from qvd_bench.collect.hooks import (
    StatsCollector,
    capture_temporal_features,
    channel_last_rows,
    describe_layer,
)
from qvd_bench.collect.moments import ChannelMoments
from qvd_bench.models import roles, zoo
from qvd_bench.models.sampling import CallTracker, DenoiserCall

PRESETS = [
    "tiny-unet3d",
    "tiny-animatediff",
    "tiny-svd",
    "tiny-i2vgenxl",
    "tiny-latte",
    "tiny-cogvideox",
    "tiny-wan",
]


def hooked(loaded):
    decisions = roles.classify(loaded)
    layers = roles.leaf_layers(loaded.denoiser)
    infos = {
        n: describe_layer(n, m, decisions[n].role, decisions[n].decided_by)
        for n, m in layers.items()
    }
    return layers, infos


def inputs(loaded, batch=1, frames=2, size=8):
    family, denoiser = loaded.family, loaded.denoiser
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(
        family.latent_shape(denoiser, batch, frames, size, size), generator=generator
    )
    length, dim = family.text_embedding_shape(denoiser)
    cond = torch.randn(batch, length, dim, generator=generator)
    uncond = torch.randn(batch, length, dim, generator=generator)
    conditioning = family.conditioning(denoiser, batch, frames, size, size, generator)
    return latents, cond, uncond, conditioning


@pytest.mark.parametrize("preset", PRESETS)
def test_batched_cfg_call_splits_into_separate_forwards(preset):
    loaded = zoo.load_model(preset)
    family, denoiser = loaded.family, loaded.denoiser.eval()
    layers, infos = hooked(loaded)
    latents, cond, uncond, conditioning = inputs(loaded)
    t = torch.tensor([700.0])
    tracker = CallTracker(denoiser).attach()

    batched = StatsCollector(layers, infos, tracker)
    with batched, tracker.batch([0]), torch.no_grad():
        family.forward(
            denoiser,
            torch.cat([latents, latents]),
            t.repeat(2),
            torch.cat([uncond, cond]),
            {k: torch.cat([v, v]) for k, v in conditioning.items()},
        )
    separate = StatsCollector(layers, infos, tracker)
    with separate, tracker.batch([0]), torch.no_grad():
        for branch, states in (("uncond", uncond), ("cond", cond)):
            with tracker.branch(branch):
                family.forward(denoiser, latents, t, states, conditioning)
    tracker.detach()

    assert set(batched.moments) == set(separate.moments)
    assert {key[3] for key in batched.moments} == {"uncond", "cond"}
    assert len(batched.moments) == 2 * len(layers)
    for key, acc in batched.moments.items():
        a, b = acc.compute(), separate.moments[key].compute()
        torch.testing.assert_close(a["count"], b["count"], rtol=0, atol=0)
        # Batch 2 vs batch 1 kernels round differently in float32: tolerance relative to
        # the layer's magnitude (the injected outliers reach ~1e3 in tiny-svd).
        scale = float(torch.maximum(b["max"].abs(), b["min"].abs()).max()) + 1.0
        for field in ("min", "max", "mean"):
            torch.testing.assert_close(
                a[field], b[field], rtol=0, atol=1e-4 * scale, msg=f"{key} {field}"
            )
    # Negative control: the branches differ, so a swapped split would be caught.
    assert any(
        not torch.allclose(
            acc.compute()["mean"], separate.moments[(*key[:3], "cond")].compute()["mean"]
        )
        for key, acc in batched.moments.items()
        if key[3] == "uncond"
    )


def test_untracked_calls_are_ignored():
    loaded = zoo.load_model("tiny-latte")
    layers, infos = hooked(loaded)
    latents, cond, _, conditioning = inputs(loaded)
    tracker = CallTracker(loaded.denoiser)  # not attached: current stays None
    collector = StatsCollector(layers, infos, tracker)
    with collector, torch.no_grad():
        loaded.family.forward(loaded.denoiser, latents, torch.tensor([10.0]), cond, conditioning)
    assert collector.moments == {}


def test_channel_last_rows_keeps_samples_apart():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2 * 3, 4, 5)  # (n*F, C, L)
    rows = channel_last_rows(x, 2, channel_dim=1)
    assert rows.shape == (2, 3 * 5, 4)
    torch.testing.assert_close(rows[1, 0], x[3, :, 0])


@pytest.mark.parametrize("preset", ["tiny-unet3d", "tiny-latte"])
def test_temporal_features_equal_direct_inputs(preset):
    loaded = zoo.load_model(preset)
    family, denoiser = loaded.family, loaded.denoiser.eval()
    decisions = roles.classify(loaded)
    names = [n for n, d in decisions.items() if d.role == "time_emb"]
    features = capture_temporal_features(loaded, names, [0.0, 250.0, 999.0], chunk=2)
    seen = {}
    modules = dict(denoiser.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(
            lambda m, a, k, n=n: seen.__setitem__(n, (a[0] if a else k["input"]).detach()),
            with_kwargs=True,
        )
        for n in names
    ]
    latents, cond, _, conditioning = inputs(loaded, frames=3, size=16)
    with torch.no_grad():
        family.forward(denoiser, latents, torch.tensor([250.0]), cond, conditioning)
    for h in handles:
        h.remove()
    for name in names:
        timesteps, vectors = features[name].as_matrix()
        assert timesteps.tolist() == [0.0, 250.0, 999.0]
        direct = seen[name].reshape(1, -1, seen[name].shape[-1])[0]
        # The feature is the same vector on every row of the call (it depends on t only).
        torch.testing.assert_close(direct, direct[:1].expand_as(direct))
        torch.testing.assert_close(vectors[1].float(), direct[0].float(), rtol=1e-5, atol=1e-5)


class SharedInputs(nn.Module):
    """Layers reading one tensor (q/k/v style), an in-place change, a layer called twice."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.after, self.twice = (nn.Linear(6, 6) for _ in range(5))

    def forward(self, x):
        y = self.q(x) + self.k(x) + self.v(x)
        x.mul_(2.0).add_(1.0)  # same object, new version: must not reuse q's moments
        y = y + self.after(x)
        return self.twice(y) + self.twice(x.flip(0))


def _shared_inputs_setup():
    torch.manual_seed(0)
    model = SharedInputs()
    layers = {n: m for n, m in model.named_children()}
    infos = {n: describe_layer(n, m, "ffn", "test") for n, m in layers.items()}
    tracker = CallTracker(model)  # calls are set by hand below
    return model, layers, infos, tracker


def test_shared_inputs_and_repeated_layers_equal_direct_updates():
    """Reused moments of a shared input, in-place changes and deferred folds are exact."""
    model, layers, infos, tracker = _shared_inputs_setup()
    collector = StatsCollector(layers, infos, tracker)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0].clone()))
        for n, m in layers.items()
    ]
    calls = [DenoiserCall(t, ("uncond", "cond"), (0,)) for t in (900.0, 500.0, 900.0)]
    with collector, torch.no_grad():
        for index, call in enumerate(calls):
            tracker.current = call
            model(torch.randn(8, 6, generator=torch.Generator().manual_seed(index)))
            if index == 1:  # read while attached: flush makes the statistics complete
                collector.flush()
                assert collector.moments[("input", "q", 900.0, "cond")].count.tolist() == [4] * 6
    for h in handles:
        h.remove()

    expected: dict[tuple, ChannelMoments] = {}
    for n in layers:
        per_call = len(seen[n]) // len(calls)
        for index, call in enumerate(calls):
            for x in seen[n][index * per_call : (index + 1) * per_call]:
                for branch, chunk in zip(call.branches, x.chunk(2)):
                    acc = expected.setdefault(
                        ("input", n, call.timestep, branch), ChannelMoments(6)
                    )
                    acc.update(chunk)
    assert set(collector.moments) == set(expected)
    for key, acc in expected.items():
        got = collector.moments[key].state_dict()
        for k, v in acc.state_dict().items():
            assert torch.equal(got[k], v), (key, k)
    # q, k and v read one tensor; "after" read it changed in place.
    q = collector.moments[("input", "q", 500.0, "cond")].compute()["mean"]
    assert torch.equal(q, collector.moments[("input", "v", 500.0, "cond")].compute()["mean"])
    after = collector.moments[("input", "after", 500.0, "cond")].compute()["mean"]
    torch.testing.assert_close(after, 2.0 * q + 1.0)
    # The twice-called layer holds both of its inputs per call: 2 calls × 2 inputs × 4 rows.
    assert collector.moments[("input", "twice", 900.0, "uncond")].count.tolist() == [16] * 6


def test_mochi_temporal_features_are_labelled_by_the_timestep_the_transformer_receives():
    """Mochi's forward turns the grid's t into 1000 - t: the labels follow the transformer,
    as the statistics keys do."""
    loaded = zoo.load_model("tiny-mochi")
    family, denoiser = loaded.family, loaded.denoiser.eval()
    name = "time_embed.timestep_embedder.linear_1"
    features = capture_temporal_features(loaded, [name], [0.0, 250.0, 999.0])
    timesteps, vectors = features[name].as_matrix()
    assert timesteps.tolist() == [1.0, 750.0, 1000.0]
    seen = []
    module = dict(denoiser.named_modules())[name]
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    frames, height, width = family.probe_size(denoiser)
    latents = torch.randn(family.latent_shape(denoiser, 1, frames, height, width))
    text = torch.zeros(1, *family.text_embedding_shape(denoiser))
    with torch.no_grad():
        # The transformer itself at its own timestep 750.
        denoiser(
            latents, text, torch.tensor([750.0]), torch.ones(text.shape[:2]), return_dict=False
        )
    handle.remove()
    np.testing.assert_array_equal(vectors[1], seen[0][0].double().numpy())


def test_a_text_layer_as_long_as_the_frames_is_not_masked_by_per_frame_timesteps():
    """Diffusion forcing's per-frame timesteps mask the rows of the time-embedding layers
    (one per frame); a cross-attention key projection whose text rows happen to number the
    frames keeps every row."""
    from qvd_bench.models.families import family_by_name
    from qvd_bench.models.family import LoadedModel

    family = family_by_name("skyreels-v2")
    torch.manual_seed(0)
    denoiser = family.build(family.tiny_config()).eval()
    loaded = LoadedModel("tiny-skyreels-v2", family, denoiser)
    frames, height, width = 3, 4, 4
    latents = torch.randn(family.latent_shape(denoiser, 1, frames, height, width))
    text = torch.randn(1, frames, denoiser.config.text_dim)  # as many text rows as frames
    per_frame = torch.tensor([[0.0, 500.0, 500.0]])  # the first frame at another level
    names = ["blocks.0.attn2.to_k", "condition_embedder.time_embedder.linear_1"]
    all_layers, infos = hooked(loaded)
    assert [infos[n].role for n in names] == ["cross_attn", "time_emb"]
    layers = {n: all_layers[n] for n in names}
    raw = {}
    handles = [
        module.register_forward_pre_hook(lambda m, a, n=n: raw.update({n: a[0].double()}))
        for n, module in layers.items()
    ]
    tracker = CallTracker(denoiser).attach()
    collector = StatsCollector(layers, {n: infos[n] for n in names}, tracker)
    try:
        with collector, tracker.batch([0]), torch.no_grad():
            denoiser(latents, per_frame, text, enable_diffusion_forcing=True, return_dict=False)
    finally:
        tracker.detach()
        for handle in handles:
            handle.remove()
    text_rows = raw[names[0]].reshape(-1, raw[names[0]].shape[-1])
    time_rows = raw[names[1]].reshape(-1, raw[names[1]].shape[-1])
    assert len(text_rows) == len(time_rows) == frames
    text_moments = collector.moments[("input", names[0], 500.0, "cond")]
    time_moments = collector.moments[("input", names[1], 500.0, "cond")]
    assert {name: int(rows) for name, rows in collector.excluded_rows.items()} == {names[1]: 1}
    assert bool((text_moments.count == frames).all())
    torch.testing.assert_close(text_moments.mean, text_rows.mean(0))
    assert bool((time_moments.count == frames - 1).all())
    torch.testing.assert_close(time_moments.mean, time_rows[1:].mean(0))
    torch.testing.assert_close(time_moments.max, time_rows[1:].max(0).values)
