"""The videos of the matrix: the FP reference and each configuration's teacher-forced and
free-running videos, generated or taken from the cache (``generate.GenerationCache``).

Every video is cached: an interrupted evaluation resumes without regenerating finished
videos (a prompt's two quantized videos are made together: one left unfinished makes its
twin again, the same bit for bit), and a rerun regenerates nothing. A configuration is
quantized on first use, on a fresh copy of the FP model (quantization swaps modules in
place); one whose videos are all cached is never quantized.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from qvd_bench.evaluate import generate as gen
from qvd_bench.evaluate.config import EvalConfig
from qvd_bench.evaluate.generate import CacheKey, Generation, GenerationCache, GenerationSettings
from qvd_bench.models.families._common import model_device_dtype
from qvd_bench.models.family import LoadedModel

# The method and bits under which the FP reference's videos are cached and timed.
REFERENCE_METHOD = "reference"
FP_BITS = "fp"
# Methods that quantize nothing: their videos are the reference's, none is generated.
NO_VIDEO_METHODS = frozenset({"fp"})


class CachedVideos:
    """Generates or loads videos through the cache, counting both.

    ``bar`` (tqdm-like) counts sampling steps: each video advances it by its steps.
    """

    def __init__(self, cache: GenerationCache, config: EvalConfig, bar):
        self.cache, self.config, self.bar = cache, config, bar
        self.generated = self.cached = 0

    def key(self, model: LoadedModel, method: str, bits: str, index: int, mode: str, context):
        return CacheKey(
            model=model.name,
            weight_seed=model.weight_seed,
            method=method,
            bits=bits,
            prompt_index=index,
            seed=self.config.settings.seed,
            mode=mode,
            context=gen.context_string(prompt=self.config.prompts[index], **context),
        )

    def get(
        self, key: CacheKey, make: Callable[[], Generation], spill_calls: bool = False
    ) -> Generation:
        generation, made = self.cache.get_or_generate(key, make, spill_calls=spill_calls)
        if made:
            self.generated += 1
        else:
            self.cached += 1
        self.bar.update(self.config.settings.steps)
        self.bar.set_postfix_str(f"{self.generated + self.cached} videos", refresh=False)
        return generation

    def skipped(self, count: int) -> None:
        """``count`` videos of the bar's total that a configuration turned out not to need."""
        self.bar.total = max(self.bar.n, self.bar.total - count * self.config.settings.steps)
        self.bar.refresh()


def device_context(model: LoadedModel) -> dict[str, str]:
    """The device type and dtype a model runs in, for cache keys: a video made in
    bfloat16 or on CUDA is not the float32 CPU one."""
    device, dtype = model_device_dtype(model.denoiser)
    return {"device": device.type, "dtype": str(dtype).removeprefix("torch.")}


def fresh_model(run, template: LoadedModel) -> LoadedModel:
    """An unquantized model of a statistics run, for one configuration to change in place.

    Building a zoo preset (random initialisation, outlier injection) costs far more than
    copying it, so each configuration gets a deep copy of the FP model ``template`` (built
    from ``run``, never quantized): the same parameters, bit for bit. A model with a
    pipeline is loaded again (the pipeline holds its own reference to the denoiser).
    """
    from qvd_bench.models import zoo

    if template.pipeline is not None:
        device, dtype = model_device_dtype(template.denoiser)
        return zoo.load_run_model(run, device=device, dtype=dtype)
    return replace(template, denoiser=copy.deepcopy(template.denoiser))


class LazyQuantized:
    """A model quantized on first use (a configuration whose videos are all cached is
    never quantized: reruns are free)."""

    def __init__(self, run, quant, plans: dict, template: LoadedModel, mixed: bool = False):
        self.run, self.quant, self.plans, self.mixed = run, quant, plans, mixed
        self.template = template  # the FP model each configuration copies
        self.loaded: LoadedModel | None = None
        self.tracker = None
        self.record = None
        self.seconds = 0.0

    def model(self) -> LoadedModel:
        from qvd_bench.models.sampling import CallTracker
        from qvd_bench.quant.apply import make_plan_for, quantize_

        if self.loaded is None:
            started = time.perf_counter()
            bits = self.quant.bits
            if bits not in self.plans:  # one plan per bit-width, shared by the methods
                self.plans[bits] = make_plan_for(self.run, self.quant)
            # Quantization swaps modules in place: every configuration gets a fresh model.
            loaded = fresh_model(self.run, self.template)
            if self.mixed:
                from qvd_bench.evaluate.sensitivity import Budget, mixed_config, probe_for_run

                budget = Budget("a", float(self.quant.a_bits))
                probe = probe_for_run(loaded, self.run)
                self.quant, _ = mixed_config(
                    loaded, self.run, self.quant, budget, probe, plan=self.plans[bits]
                )
            # On every expert: each one's per-timestep quantizers read the tracker.
            self.tracker = CallTracker(loaded.experts).attach()
            self.record = quantize_(
                loaded, self.quant, stats=self.run, plan=self.plans[bits], tracker=self.tracker
            )
            self.loaded = loaded
            self.seconds = time.perf_counter() - started
        return self.loaded

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.detach()


def reference_videos(
    videos: CachedVideos,
    loaded: LoadedModel,
    settings: GenerationSettings,
    indices: Sequence[int] | None = None,
) -> dict[int, Generation]:
    """The FP model's free-running videos of some prompts (all by default), by index."""
    context = {
        "settings": settings.to_dict(),
        "knobs": loaded.knobs,
        **device_context(loaded),
        **gen.sampler_context(loaded),
    }
    prompts = videos.config.prompts
    indices = range(len(prompts)) if indices is None else indices
    return {
        i: videos.get(
            videos.key(loaded, REFERENCE_METHOD, FP_BITS, i, "free", context),
            # Pipeline runs keep their denoiser calls: the quantized models replay them,
            # read from the cache file one video at a time (not all held in memory).
            lambda i=i: gen.generate(loaded, prompts[i], i, settings, keep_calls=True),
            spill_calls=True,
        )
        for i in indices
    }


def quantized_videos(
    videos: CachedVideos,
    fp_model: LoadedModel,
    reference: dict[int, Generation],
    quantized: LazyQuantized,
    context: dict[str, Any],
) -> tuple[dict[int, Generation], dict[int, Generation]]:
    """A configuration's teacher-forced and free-running videos of the reference's prompts.

    Args:
        videos: the cache and counters.
        fp_model: the FP model (names the cache entries).
        reference: prompt index -> the FP video it is teacher-forced on.
        quantized: the configuration, quantized on first use.
        context: what else decides the videos (for the cache key).

    Returns:
        (teacher-forced, free-running), each prompt index -> video. A configuration that
        quantizes no layer is the FP model: its videos are the reference's, and nothing is
        generated or cached.
    """
    config, settings = videos.config, videos.config.settings
    quant = quantized.quant
    # The scheme is part of what decides the videos (batch composition sets the rounding):
    # videos cached under another scheme are never mixed with these.
    context = {
        **context,
        "scheme": gen.free_and_forced_scheme(fp_model),
        **device_context(fp_model),
        **gen.sampler_context(fp_model),
    }
    keys = {
        (i, mode): videos.key(fp_model, quant.method, quant.bits, i, mode, context)
        for i in reference
        for mode in ("teacher", "free")
    }
    if not all(videos.cache.path(key).exists() for key in keys.values()):
        quantized.model()
        if not quantized.record.quantized:
            if quant.method not in NO_VIDEO_METHODS:  # counted in the total: take it out
                videos.skipped(len(keys))
            return reference, reference

    pairs: dict[int, tuple[Generation, Generation]] = {}

    def made(i: int, mode: str) -> Generation:
        # A prompt's two videos share their forwards, so both are made at once; after an
        # interruption between their saves, the missing one is made the same way (and
        # the other again, the same).
        if i not in pairs:
            pairs[i] = gen.generate_free_and_forced(
                quantized.model(),
                config.prompts[i],
                i,
                settings,
                teacher=reference[i],
                tracker=quantized.tracker,
            )
        return pairs[i][0 if mode == "free" else 1]

    forced, free = {}, {}
    for i in reference:
        free[i] = videos.get(keys[(i, "free")], lambda i=i: made(i, "free"))
        forced[i] = videos.get(keys[(i, "teacher")], lambda i=i: made(i, "teacher"))
    return forced, free
