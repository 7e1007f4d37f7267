"""The layer table, role table, headline and ``analyze`` on collected tiny-model statistics."""

import numpy as np
import pandas as pd
import pytest

from qvd_bench.analysis import QuantPlan, analyze, headline, layer_summary, role_summary
from qvd_bench.analysis.summary import ANALYSIS_FILE, PLAN_FILE, TEMPORAL_ROLE_LABEL
from qvd_bench.collect.collector import collect
from qvd_bench.config import CollectConfig
from qvd_bench.errors import UserError
from qvd_bench.store import StatsRun

MODELS = ("tiny-unet3d", "tiny-svd")
SPATIAL = ("spatial_conv", "self_attn", "cross_attn", "ffn")


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """model -> (run, layer table, plan), each from a small collection analysed once."""
    out = {}
    for model in MODELS:
        run_dir = tmp_path_factory.mktemp(model) / "run"
        config = CollectConfig(
            model=model,
            prompts=("a cat",),
            steps=2,
            frames=2,
            height=8,
            width=8,
            temporal_stride=50,
            reservoir_capacity=32,
        )
        collect(config, run_dir, progress=False)
        table, plan = analyze(run_dir)
        out[model] = (StatsRun(run_dir), table, plan)
    return out


@pytest.mark.parametrize("model", MODELS)
def test_layer_table_has_every_layer_and_coverage_for_every_role(analysed, model):
    run, table, _ = analysed[model]
    assert table["layer"].tolist() == run.layers["name"].tolist()  # module order
    assert table["role"].tolist() == run.layers["role"].tolist()
    for bits in (8, 4):
        for column in (f"coverage_mean_a{bits}", f"coverage_below10_a{bits}"):
            assert table[column].between(0, 1).all(), column
    # Coverage lies in [1/2^b, 1] and is reported for every role.
    assert (table["coverage_mean_a8"] >= 1 / 256).all()
    assert (table["coverage_mean_a4"] >= table["coverage_mean_a8"]).all()
    roles = role_summary(table).set_index("role")
    assert roles.loc[table["role"].unique(), "median_coverage_mean_a8"].notna().all()
    assert np.isfinite(table[["skew_median", "kurtosis_median", "drift"]]).all().all()
    assert (table["timesteps"] == 2).all()


@pytest.mark.parametrize("model", MODELS)
def test_temporal_features_are_more_skewed_than_spatial_activations(analysed, model):
    _, table, _ = analysed[model]
    features = table[table["has_temporal"]]
    assert len(features) and (features["role"] == "time_emb").all()
    assert np.isfinite(features["temporal_skew"]).all()
    assert (features["temporal_timesteps"] == 20).all()  # range(0, 1000, 50)
    temporal = features["temporal_skew"].abs().median()
    spatial = table[table["role"].isin(SPATIAL)]["skew_median"].abs().median()
    # Measured with the presets' default outlier injection: about 5.6 against 1.8-2.1.
    assert temporal > spatial
    # Post-SiLU features: the floor of SiLU, most values near zero, a long positive tail.
    post_silu = features[features["temporal_skew"] > 1]
    assert len(post_silu)
    assert post_silu["temporal_min"].between(-0.2786, -0.27).all()
    assert (post_silu["temporal_low_share"] > 0.5).all()


@pytest.mark.parametrize("model", MODELS)
def test_plan_decisions_match_the_table(analysed, model):
    _, table, plan = analysed[model]
    assert [p.layer for p in plan.layers] == table["layer"].tolist()
    t = plan.thresholds
    skewed = table["has_temporal"] & (table["temporal_skew"].abs() > t.temporal_skew)
    assert [p.htdq.apply for p in plan.layers] == skewed.tolist()
    assert [p.family == "htdq" for p in plan.layers] == skewed.tolist()
    # The embedding MLP's first layer reads sinusoids: time_emb, yet not skewed.
    first = plan.layer("time_embedding.linear_1")
    assert first.role == "time_emb" and not first.htdq.apply
    low = table["coverage_mean_a8"] < t.coverage
    spread = (table["disparity"] > t.disparity) | (table["asymmetry_abs_mean"] > t.asymmetry)
    assert [p.scri.apply for p in plan.layers] == (low & spread).tolist()
    heavy = table["kurtosis_median"] > t.kurtosis
    assert [p.clipping == "mse" for p in plan.layers] == heavy.tolist()
    for entry in plan.layers:
        for decision in (entry.htdq, entry.scri, entry.clipping_reason):
            assert decision.reason and "\n" not in decision.reason


@pytest.mark.parametrize("model", MODELS)
def test_analyze_writes_table_and_plan(analysed, model):
    run, table, plan = analysed[model]
    stored = pd.read_parquet(run.path / ANALYSIS_FILE)
    pd.testing.assert_frame_equal(stored, table)
    assert QuantPlan.load(run.path / PLAN_FILE) == plan
    assert plan.model == model and (plan.w_bits, plan.a_bits) == (8, 8)


def test_role_summary_keeps_temporal_features_apart(analysed):
    _, table, _ = analysed["tiny-unet3d"]
    roles = role_summary(table)
    assert roles["role"].tolist()[-1] == TEMPORAL_ROLE_LABEL
    assert roles.set_index("role")["level"].to_dict()[TEMPORAL_ROLE_LABEL] == "temporal"
    assert set(roles["level"].iloc[:-1]) == {"tensor"}
    row = roles.iloc[-1]
    features = table[table["has_temporal"]]
    assert row["layers"] == len(features)
    assert row["median_abs_skew"] == pytest.approx(features["temporal_skew"].abs().median())
    assert roles["layers"].iloc[:-1].sum() == len(table)


def test_headline_fits_a_screen(analysed):
    _, table, plan = analysed["tiny-svd"]
    text = headline(table, plan)
    lines = text.splitlines()
    assert len(lines) < 20 and max(map(len, lines)) <= 110
    for role in [*table["role"].unique(), TEMPORAL_ROLE_LABEL]:
        assert role in text
    assert "cov A8" in text and "cov A4" in text and "HTDQ" in text and "SCRI" in text


@pytest.mark.parametrize(
    "kwargs", [{"a_bits": 0}, {"a_bits": 33}, {"w_bits": 33}, {"bits": (8, 0)}]
)
def test_bad_bit_width(analysed, kwargs):
    run, _, _ = analysed["tiny-unet3d"]
    with pytest.raises(UserError, match="bit-width must be between 2 and 16"):
        analyze(run.path, **kwargs)
    with pytest.raises(UserError, match="bit-width must be between 2 and 16"):
        layer_summary(run, bits=(33,))


def test_missing_run(tmp_path):
    with pytest.raises(UserError, match="no statistics run"):
        analyze(tmp_path / "nothing")


@pytest.mark.parametrize("model", MODELS)
def test_stored_layer_summary_reads_what_analyze_wrote(analysed, model, monkeypatch):
    run, table, _ = analysed[model]
    from qvd_bench.analysis import summary

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed")

    with monkeypatch.context() as patch:
        patch.setattr(summary, "layer_summary", no_recompute)
        pd.testing.assert_frame_equal(summary.stored_layer_summary(run, (8, 4)), table)
        # A subset of the stored bit-widths: the stored table without the other columns.
        for bits in ((8,), (4,)):
            pd.testing.assert_frame_equal(
                summary.stored_layer_summary(run, bits), layer_summary(run, bits)
            )
    # Bit-widths that are not stored, or in another order: computed.
    for bits in ((6,), (4, 8), (8, 4, 2)):
        calls = []
        with monkeypatch.context() as patch:
            patch.setattr(
                summary, "layer_summary", lambda *a, seen=calls: seen.append(a) or "computed"
            )
            assert summary.stored_layer_summary(run, bits) == "computed"
        assert calls == [(run, list(bits))]


def test_stored_layer_summary_recomputes_without_a_readable_file(analysed, tmp_path):
    import shutil

    from qvd_bench.analysis.summary import stored_layer_summary

    run, table, _ = analysed["tiny-unet3d"]
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    (copy / ANALYSIS_FILE).write_bytes(b"not parquet")
    pd.testing.assert_frame_equal(stored_layer_summary(StatsRun(copy)), table)
    (copy / ANALYSIS_FILE).unlink()
    pd.testing.assert_frame_equal(stored_layer_summary(StatsRun(copy)), table)
