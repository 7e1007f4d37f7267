"""The evaluation matrix: results rows, fidelity values, resume, reference, bad input."""

import math

import pandas as pd
import pytest
import torch

from qvd_bench.errors import UserError
from qvd_bench.evaluate import fidelity, harness
from qvd_bench.evaluate import generate as gen
from qvd_bench.evaluate.generate import CacheKey, GenerationCache, GenerationSettings
from qvd_bench.models import zoo

SETTINGS = GenerationSettings(steps=2, frames=2, height=16, width=16)
PROMPTS = ("a cat", "a dog")


def _config(**overrides):
    values = dict(prompts=PROMPTS, methods=("fp", "minmax"), bits=("W8A8",), settings=SETTINGS)
    values.update(overrides)
    return harness.EvalConfig(**values)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = harness.evaluate(_config(metrics=("fvd",)), out, progress=False)
    return out, result


def _cached(results_dir, method, bits, mode):
    """The cached generations of one configuration, in prompt order."""
    root = GenerationCache(results_dir).root / "tiny-unet3d-w0" / method / bits
    return [GenerationCache.load_path(p) for p in sorted(root.glob(f"p*-{mode}-*.safetensors"))]


def test_results_table_rows_and_outputs(evaluated):
    out, result = evaluated
    frame = pd.read_parquet(result.results_dir / harness.RESULTS_FILE)
    assert tuple(frame.columns) == harness.RESULT_COLUMNS
    assert set(frame["method"]) == {"fp", "minmax"}
    assert set(frame["metric"]) == {"sqnr", "cosine", "psnr", "ssim"}
    assert (frame["n"] == 2).all() and (frame["reference"] == "fp").all()
    # Per step (0, 1) and over all steps (-1), for each branch.
    tf = frame[(frame["mode"] == "teacher-forced") & (frame["method"] == "minmax")]
    assert set(tf["step"]) == {-1, 0, 1}
    assert set(tf["branch"]) == {"cfg", "uncond", "cond"}
    assert (out / "reports" / "tiny-unet3d" / "index.html").is_file()
    assert (out / "stats" / "tiny-unet3d-w0" / "analysis.parquet").is_file()
    # FVD weights are absent: skipped with a notice naming the option.
    assert any("fvd skipped" in n and "--fvd-weights" in n for n in result.notices)


def test_fp_method_is_inf_against_itself(evaluated):
    _, result = evaluated
    fp = result.results[result.results["method"] == "fp"]
    for metric in ("sqnr", "psnr"):
        assert (fp[fp["metric"] == metric]["value"] == math.inf).all()
    for metric in ("cosine", "ssim"):
        values = fp[fp["metric"] == metric]["value"]
        assert values.to_numpy() == pytest.approx([1.0] * len(values), abs=1e-12)


def test_fidelity_numbers_equal_a_direct_computation(evaluated):
    out, result = evaluated
    loaded = zoo.load_model("tiny-unet3d")
    scheduler = gen.scheduler_for(loaded, SETTINGS)
    results_dir = result.results_dir
    reference = _cached(results_dir, "reference", "fp", "free")
    forced = _cached(results_dir, "minmax", "W8A8", "teacher")
    free = _cached(results_dir, "minmax", "W8A8", "free")
    assert len(reference) == len(forced) == len(free) == 2
    frame = result.results[result.results["method"] == "minmax"]

    def value(metric, mode, step, branch="cfg"):
        row = frame[
            (frame["metric"] == metric)
            & (frame["mode"] == mode)
            & (frame["step"] == step)
            & (frame["branch"] == branch)
        ]
        assert len(row) == 1
        return float(row["value"].iloc[0])

    ref_x0 = torch.cat([g.x0(scheduler) for g in reference], dim=1)
    test_x0 = torch.cat(
        [f.x0(scheduler, "cfg", g.model_inputs) for f, g in zip(forced, reference)], 1
    )
    assert value("sqnr", "teacher-forced", 1) == float(fidelity.sqnr(ref_x0[1], test_x0[1]))
    assert value("cosine", "teacher-forced", 0) == float(
        fidelity.cosine_similarity(ref_x0[0], test_x0[0])
    )
    assert value("sqnr", "teacher-forced", -1) == float(
        fidelity.sqnr(ref_x0.flatten(0, 1), test_x0.flatten(0, 1))
    )
    ref = torch.cat([g.latents for g in reference])
    test = torch.cat([g.latents for g in free])
    assert value("sqnr", "free-running", -1) == float(fidelity.sqnr(ref, test))
    lo, hi = float(ref.min()), float(ref.max())

    def frames(x):  # (B, C, F, H, W) -> (B, F, C, H, W) in [0, 1] by the reference range
        return ((x.double() - lo) / (hi - lo)).transpose(1, 2)

    assert value("psnr", "free-running", -1) == float(fidelity.psnr(frames(ref), frames(test)))
    assert value("ssim", "free-running", -1) == float(fidelity.ssim(frames(ref), frames(test)))


def test_interrupted_evaluation_resumes_without_regenerating(tmp_path, monkeypatch, evaluated):
    stats = str(evaluated[1].stats_dirs[0])
    config = _config(stats=stats, methods=("minmax",))
    save = GenerationCache.save
    saved = []

    def save_then_interrupt(self, key, generation):
        save(self, key, generation)
        saved.append(key)
        raise KeyboardInterrupt

    monkeypatch.setattr(GenerationCache, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        harness.evaluate(config, tmp_path, progress=False, write_report=False)
    assert len(saved) == 1
    monkeypatch.setattr(GenerationCache, "save", save)

    calls = []
    generate = gen.generate

    def counting(*args, **kwargs):
        calls.append(args[1:3])
        return generate(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", counting)
    result = harness.evaluate(config, tmp_path, progress=False, write_report=False)
    # 2 reference videos + 2 prompts x (teacher, free) = 6, one of them finished before.
    assert len(calls) == 5 and result.generated == 5 and result.cached == 1
    calls.clear()
    again = harness.evaluate(config, tmp_path, progress=False, write_report=False)
    assert calls == [] and again.generated == 0 and again.cached == 6
    pd.testing.assert_frame_equal(again.results, result.results)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prompts": ()}, "no prompts"),
        ({"metrics": ("fdv",)}, "unknown metric 'fdv'; did you mean 'fvd'"),
        ({"methods": ("minmx",)}, "did you mean 'minmax'"),
        ({"bits": ("W4",)}, "W4A8"),
        ({"reference": "/no/such/dir"}, "--reference"),
        ({"weight_seeds": (0, 1), "stats": "x"}, "--stats"),
    ],
)
def test_bad_input_is_a_one_line_user_error(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        _config(**overrides)
    assert "\n" not in str(info.value)


def test_comparing_across_protocol_ids_is_refused():
    rows = pd.DataFrame(
        {"metric": ["fvd", "fvd", "sqnr"], "protocol": ["fvd/a", "fvd/b", "fidelity/x0"]}
    )
    with pytest.raises(UserError, match="different protocol ids"):
        harness.check_protocols(rows)
    harness.check_protocols(rows.iloc[1:])


def test_headline_table_reports_mean_and_spread_over_seeds():
    rows = []
    for seed, value in ((0, 10.0), (1, 12.0)):
        for metric, mode in (("sqnr", "teacher-forced"), ("psnr", "free-running")):
            rows.append(
                dict(method="minmax", bits="W8A8", weight_seed=seed, metric=metric, mode=mode,
                     branch="cfg", step=-1, value=value)
            )  # fmt: skip
    table = harness.headline_table(pd.DataFrame(rows))
    assert table["SQNR tf (dB)"].iloc[0] == 11.0
    assert table["SQNR tf (dB) sd"].iloc[0] == pytest.approx(2**0.5)
    assert table["seeds"].iloc[0] == 2


def test_cache_key_includes_everything_that_decides_a_video():
    a = CacheKey("m", 0, "minmax", "W8A8", 0, 0, "free", gen.context_string(steps=2))
    b = CacheKey("m", 0, "minmax", "W8A8", 0, 0, "free", gen.context_string(steps=3))
    assert a.relative_path() != b.relative_path()
