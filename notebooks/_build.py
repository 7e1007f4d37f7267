"""Writes the notebooks in this folder from the cell sources below, without outputs.

    python notebooks/_build.py            # rewrite every notebook
    python notebooks/_build.py --check    # fail if a stored notebook differs from its source

Edit the cells here, not in the .ipynb files, so that changes stay reviewable as code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

TINY_NOTE = (
    "> **Tiny presets.** The built-in `tiny-*` models have random weights with injected "
    "outlier channels (per-channel gains and offsets, recorded in the manifest as knobs). "
    "On them the numbers below test the machinery; they are not findings about trained "
    "video diffusion models. Point `RUN` at a run collected from a real pipeline for that."
)

PARAMETERS = "RUN = None  # path to a stats run; None collects a small one on tiny-unet3d"

IMPORTS = """\
import shutil
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from qvd_bench.models.family import ROLES
from qvd_bench.store import StatsRun

torch.set_num_threads(1)  # the tiny models run fastest on one thread
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a bare kernel
sns.set_theme(style="whitegrid", context="notebook")
pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 20)
pd.set_option("display.precision", 3)
pd.set_option("display.max_colwidth", 64)"""


def load_cell(extra: str = "") -> str:
    """The cell that collects a small run into a temporary directory when RUN is None."""
    extra_line = f"\n        {extra}," if extra else ""
    return f"""\
COLLECTED = RUN is None
if COLLECTED:
    from qvd_bench.collect.collector import collect
    from qvd_bench.config import CollectConfig
    from qvd_bench.prompts import DEFAULT_PROMPTS

    RUN = Path(tempfile.mkdtemp(prefix="qvd-bench-")) / "tiny-unet3d"
    config = CollectConfig(
        model="tiny-unet3d",
        prompts=DEFAULT_PROMPTS[:2],
        steps=6,
        frames=4,
        height=16,
        width=16,
        temporal_stride=10,
        reservoir_capacity=256,{extra_line}
    )
    collect(config, RUN, progress=False)

run = StatsRun(RUN)
ROLE_OF = dict(zip(run.layers["name"], run.layers["role"]))
ORDER = [r for r in ROLES if r in set(ROLE_OF.values())]
info = run.manifest["model"]
print(RUN)
print(f"{{info['name']}} ({{info['denoiser_class']}}), random weights: {{info['random_weights']}}, "
      f"knobs: {{info.get('knobs')}}")
print("sampling timesteps:", run.manifest["schedule"])
run.layers["role"].value_counts().rename("layers").to_frame().T"""


CLEANUP_MD = "## Clean up\n\nRemoves the temporary run if this notebook collected it."
CLEANUP = """\
if COLLECTED:
    shutil.rmtree(Path(RUN).parent, ignore_errors=True)"""


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str, **metadata):
    cell = new_code_cell(text.strip("\n"))
    cell.metadata.update(metadata)
    return cell


def parameters():
    return code(PARAMETERS, tags=["parameters"])


# ------------------------------------------------------------------ 01 activation distributions

NB01 = [
    md(
        f"""
# 01 · Activation distributions

How skewed and heavy-tailed are the inputs of each Linear/Conv layer, by layer role and
across the sampling timesteps? Skewness is kept at declared levels that are never mixed:

- **channel**: one channel over the tokens of one call (one timestep, one CFG branch);
- **tensor**: all values of a layer input at one timestep, merged exactly from the channel
  moments (or from the stored histogram, for quartiles).

Moment skew is g1 = √n·M3/M2^1.5, kurtosis is the excess kurtosis g2 = n·M4/M2² − 3.

{TINY_NOTE}
"""
    ),
    parameters(),
    code(IMPORTS),
    md(
        """
## The run

With `RUN = None` this collects a small run on `tiny-unet3d` into a temporary directory
(two prompts, six steps, 4×16×16 latents) and loads it; otherwise it loads the run at `RUN`.
"""
    ),
    code(load_cell()),
    code(
        """
from qvd_bench.analysis.distribution import (
    channel_skew,
    quartile_skew,
    skew_by_role,
    tensor_skew,
)
from qvd_bench.numerics.edges import edges_from_dict
"""
    ),
    md(
        """
## Per-channel skewness and kurtosis by role

One value per (layer, timestep, branch, channel). Look for roles whose channels are
skewed one way (the median far from 0) and roles with heavy tails (large kurtosis):
a symmetric uniform quantizer wastes levels on both.

`time_emb` inputs are constant over the tokens of a call (one vector per timestep,
broadcast to every frame), so their within-call moments are undefined: they appear as
`n_nan` in the table and are studied across timesteps in notebook 02.
"""
    ),
    code(
        """
cs = channel_skew(run.channels)
pd.concat([skew_by_role(cs, "skewness"), skew_by_role(cs, "kurtosis")], ignore_index=True)
"""
    ),
    code(
        """
defined = cs.dropna(subset=["skewness"])
roles = [r for r in ORDER if r in set(defined["role"])]
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for ax, column, label in zip(axes, ["skewness", "kurtosis"], ["skewness g1", "excess kurtosis g2"]):
    sns.boxplot(data=defined, x="role", y=column, order=roles, fliersize=1, ax=ax)
    ax.set(xlabel="layer role", ylabel=f"{label} (dimensionless)", yscale="symlog")
    ax.tick_params(axis="x", rotation=30)
fig.suptitle("Per-channel statistics over the tokens of one call")
fig.tight_layout()
"""
    ),
    md(
        """
## Per-tensor skewness across timesteps

The whole input of a layer at one timestep, both CFG branches merged. Lines are the
median over the layers of a role. Sampling starts at the left (high t, mostly noise).
A role whose skew or kurtosis moves with t is a candidate for timestep-aware
quantization parameters.
"""
    ),
    code(
        """
ts = tensor_skew(run.channels, merge_branches=True)
fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharex=True)
for ax, column, label in zip(axes, ["skewness", "kurtosis"], ["skewness g1", "excess kurtosis g2"]):
    sns.lineplot(data=ts, x="timestep", y=column, hue="role", hue_order=ORDER,
                 estimator="median", errorbar=None, marker="o", ax=ax)
    ax.set(xlabel="timestep t (sampling runs left to right)", ylabel=f"{label} (dimensionless)")
axes[0].invert_xaxis()  # shared x: inverts both
axes[0].get_legend().remove()
axes[1].legend(title="role", bbox_to_anchor=(1.02, 1), loc="upper left")
axes[1].set_yscale("symlog")
fig.suptitle("Per-tensor statistics per timestep (median over the layers of a role)")
fig.tight_layout()
"""
    ),
    md("The layers whose tensor skew changes most over the sampling trajectory:"),
    code(
        """
spread = ts.groupby(["layer", "role"], observed=True)["skewness"].agg(["min", "median", "max"])
spread["range"] = spread["max"] - spread["min"]
spread.sort_values("range", ascending=False).head(8)
"""
    ),
    md(
        """
## CFG branches compared

With classifier-free guidance every step runs the denoiser on the conditional and the
unconditional branch; a quantizer calibrated on both must cover both. Left: per-tensor
skew of the two branches at the same (layer, timestep) — points off the diagonal are
layers whose shape differs between branches. Right: the ratio of the largest magnitude
in the conditional branch to that in the unconditional one, in bits (log2): ±1 means one
branch needs twice the range of the other. Cross-attention key/value inputs are the text
states, which differ between the prompt and the empty prompt.
"""
    ),
    code(
        """
tb = tensor_skew(run.channels)
tb["absmax"] = np.maximum(tb["min"].abs(), tb["max"].abs())
wide = tb.pivot_table(index=["layer", "role", "timestep"], columns="branch",
                      values=["skewness", "absmax"], observed=True)
wide.columns = [f"{stat}_{branch}" for stat, branch in wide.columns]
wide = wide.reset_index()
wide["log2_absmax_ratio"] = np.log2(wide["absmax_cond"] / wide["absmax_uncond"])
wide.groupby("role", observed=True)[["log2_absmax_ratio"]].describe()
"""
    ),
    code(
        """
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
sns.scatterplot(data=wide, x="skewness_uncond", y="skewness_cond", hue="role", hue_order=ORDER,
                s=12, alpha=0.7, ax=axes[0])
pair = wide[["skewness_uncond", "skewness_cond"]]
lims = [pair.min().min(), pair.max().max()]
axes[0].plot(lims, lims, color="grey", lw=1, ls="--")
axes[0].set(xlabel="skewness g1, unconditional branch", ylabel="skewness g1, conditional branch")
axes[0].legend(title="role", fontsize=8)
sns.boxplot(data=wide, x="role", y="log2_absmax_ratio", order=ORDER, fliersize=1, ax=axes[1])
axes[1].axhline(0, color="grey", lw=1)
axes[1].set(xlabel="layer role", ylabel="log2 of max|x| ratio, cond/uncond (bits)")
axes[1].tick_params(axis="x", rotation=30)
fig.suptitle("Per-tensor statistics, conditional vs unconditional branch, per (layer, timestep)")
fig.tight_layout()
"""
    ),
    md(
        """
## Moment skew vs quartile (Bowley) skew

g1 is driven by the tails: a few outlier channels are enough to make it large. Bowley
skew (Q3 + Q1 − 2·Q2)/(Q3 − Q1) looks only at the middle half of the values and lies in
[−1, 1]. Its quartiles come from the stored histograms (a signed log-spaced grid with
bounded relative error). Points with large g1 but Bowley skew near 0 are tensors with a
symmetric bulk and a one-sided tail — outliers, not a skewed bulk; clipping handles the
former, an asymmetric or non-uniform quantizer the latter.
"""
    ),
    code(
        """
edges_spec = run.manifest["histogram"]["edges"]
qs = quartile_skew(run.histograms, edges_spec, merge_branches=True)
quartiles = qs[["layer", "timestep", "q1", "q2", "q3", "bowley_skew"]]
both = ts.merge(quartiles, on=["layer", "timestep"])
both.groupby("role", observed=True)[["skewness", "bowley_skew"]].median()
"""
    ),
    code(
        """
fig, ax = plt.subplots(figsize=(7, 4.5))
sns.scatterplot(data=both, x="skewness", y="bowley_skew", hue="role", hue_order=ORDER,
                s=14, alpha=0.7, ax=ax)
ax.axhline(0, color="grey", lw=1)
ax.axvline(0, color="grey", lw=1)
ax.set(xscale="symlog", xlabel="moment skewness g1 (dimensionless, symlog)",
       ylabel="Bowley skew (dimensionless, in [-1, 1])",
       title="Per-tensor skew per timestep: moments vs quartiles")
ax.legend(title="role", bbox_to_anchor=(1.02, 1), loc="upper left")
fig.tight_layout()
"""
    ),
    md(
        """
## Histograms of a few layers

For the most skewed layer (median |g1| over timesteps) of a few roles, the stored bins at
the first and the last sampling timestep, both branches added. The stored grid is
log-spaced (bins widen with |x|), so the bins are re-binned onto 80 equal-width bins for
display and shown as a density on a log scale: look for one-sided tails, a floor (an
activation function's minimum) and isolated outlier mass far from the bulk.
"""
    ),
    code(
        """
EDGES = edges_from_dict(edges_spec).edges().numpy()


def density(layer, timestep, bins=80):
    h = run.histograms
    rows = h[(h["layer"] == layer) & (h["timestep"] == timestep)]
    counts = rows.groupby("bin")["count"].sum()
    lo, hi = EDGES[counts.index], EDGES[counts.index + 1]
    centre = np.where(np.isinf(lo), hi, np.where(np.isinf(hi), lo, (lo + hi) / 2))
    grid = np.linspace(centre.min(), centre.max(), bins + 1)
    total, _ = np.histogram(centre, grid, weights=counts.to_numpy())
    return (grid[:-1] + grid[1:]) / 2, total / total.sum() / np.diff(grid)


abs_skew = ts.assign(abs_skew=ts["skewness"].abs())
median_abs = abs_skew.groupby(["role", "layer"], observed=True)["abs_skew"].median()
picks = median_abs.dropna().groupby(level="role", observed=True).idxmax()
picks = [picks[r][1] for r in ORDER if r in picks.index and r != "time_emb"][:4]
picks
"""
    ),
    code(
        """
steps = sorted(run.histograms["timestep"].unique())
first, last = steps[-1], steps[0]
fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 3.6), squeeze=False)
for ax, layer in zip(axes[0], picks):
    for t in (first, last):
        x, d = density(layer, t)
        ax.step(x, d, where="mid", label=f"t = {t:g}")
    ax.set(yscale="log", xlabel="input value (activation units)", ylabel="density (1 / unit)")
    ax.set_title(f"{ROLE_OF[layer]}\\n{layer}", fontsize=8)
    ax.legend(fontsize=8)
fig.tight_layout()
"""
    ),
    md(CLEANUP_MD),
    code(CLEANUP),
]


# ------------------------------------------------------------------ 02 temporal features

NB02 = [
    md(
        f"""
# 02 · Temporal features

Temporal features are the inputs of the layers that consume the timestep embedding (the
timestep-embedding MLP, each ResNet's `time_emb_proj`, adaLN modulation): they depend only
on the timestep, not on the latent, and are broadcast to every frame and token. The run
stores them exactly on a grid of training timesteps (probe forwards), so they can be
studied *across timesteps* — the only level at which they vary.

This notebook looks at their shape (heat maps, the SiLU floor at about −0.278 and the
long positive tail), their skew per dimension across timesteps, and what uniform and
log2 quantizers do to them as the consuming layer sees it (TDScore and relative MSE).

{TINY_NOTE}
"""
    ),
    parameters(),
    code(IMPORTS),
    md(
        """
## The run

With `RUN = None` this collects a small run on `tiny-unet3d` into a temporary directory,
hooking only the `time_emb` layers (everything here reads the temporal features; a full
run works as well). The temporal features are captured every 10 training timesteps.
"""
    ),
    code(load_cell(extra='roles=("time_emb",)')),
    code(
        """
from qvd_bench.analysis.distribution import channel_skew, temporal_channel_skew, temporal_layer_skew
from qvd_bench.analysis.temporal import log2_quantize, tdscore, uniform_quantize
"""
    ),
    md(
        """
## Which layers consume temporal features

One (timesteps × dimensions) matrix per `time_emb` layer. Several layers often read the
same vector (in a diffusers UNet every ResNet's `time_emb_proj` reads SiLU of the same
embedding); the table groups layers with identical inputs, and the plots below show one
representative per group.
"""
    ),
    code(
        """
names = [n for n in run.layers["name"] if n in set(run.temporal["layer"])]
MATS = {n: run.temporal_matrix(n) for n in names}
groups = {}
for n in names:
    groups.setdefault(MATS[n][1].tobytes(), []).append(n)
REPS = [members[0] for members in groups.values()]
pd.DataFrame([
    {"input of": members[0], "also read by": len(members) - 1,
     "timesteps": MATS[members[0]][1].shape[0], "dimensions": MATS[members[0]][1].shape[1],
     "min": MATS[members[0]][1].min(), "max": MATS[members[0]][1].max()}
    for members in groups.values()
])
"""
    ),
    md(
        """
Within one call a temporal feature is the same vector for every token, so the
per-channel (within-call) skewness of these layers is undefined — NaN by design, which is
why temporal features need their own level:
"""
    ),
    code(
        """
te = run.channels[run.channels["role"] == "time_emb"]
defined = channel_skew(te)["skewness"].notna().mean()
print(f"within-call channel skewness defined for {defined:.0%} of the time_emb channel rows")
"""
    ),
    md(
        """
## Heat map: timestep × dimension

Each panel is one input matrix; dimensions are sorted by their mean over timesteps.
Colours are centred on 0 (blue below, red above) and saturate at the 99th percentile.
Look for: the sinusoidal embedding (smooth bands, values in [−1, 1]) against the SiLU
outputs (almost everything near 0, a few dimensions large and changing with t).
"""
    ),
    code(
        """
from matplotlib.colors import TwoSlopeNorm

reps = REPS[:4]
fig, axes = plt.subplots(1, len(reps), figsize=(4.5 * len(reps), 4), squeeze=False)
for ax, n in zip(axes[0], reps):
    t, e = MATS[n]
    e = e[:, np.argsort(e.mean(axis=0))]
    top = max(np.quantile(e, 0.99), 1e-6)
    norm = TwoSlopeNorm(vmin=min(e.min(), -1e-6), vcenter=0.0, vmax=top)
    im = ax.imshow(e, aspect="auto", cmap="RdBu_r", norm=norm, origin="lower",
                   extent=[0, e.shape[1], t[0], t[-1]], interpolation="nearest")
    ax.grid(False)
    fig.colorbar(im, ax=ax, extend="max", label="feature value (activation units)")
    ax.set(xlabel="dimension (sorted by mean)", ylabel="training timestep t")
    ax.set_title(n, fontsize=9)
fig.tight_layout()
"""
    ),
    md(
        """
## The SiLU floor and the long positive tail

SiLU(x) = x·σ(x) has a minimum of about −0.278 (at x ≈ −1.278). After it, every negative
value is squeezed into [−0.278, 0) while positive values are unbounded: a min-max uniform
quantizer spends most of its levels on a tail that few values reach. The histogram pools
every (timestep, dimension) value of the SiLU-fed inputs.
"""
    ),
    code(
        """
x = torch.linspace(-5, 0, 200001, dtype=torch.float64)
FLOOR = float((x * torch.sigmoid(x)).min())
silu_fed = [n for n in REPS if MATS[n][1].min() >= FLOOR - 1e-4]
rows = []
for n in silu_fed:
    v = MATS[n][1].ravel()
    rows.append({"input of": n, "min": v.min(), "share < 0": (v < 0).mean(),
                 "share within 0.02 of floor": (v < FLOOR + 0.02).mean(),
                 "median": np.median(v), "q99": np.quantile(v, 0.99), "max": v.max(),
                 "max / |floor|": v.max() / abs(FLOOR)})
print(f"SiLU floor: {FLOOR:.4f}")
pd.DataFrame(rows)
"""
    ),
    code(
        """
fig, ax = plt.subplots(figsize=(8, 3.8))
for n in silu_fed:
    ax.hist(MATS[n][1].ravel(), bins=200, histtype="step", lw=1.2, label=n)
ax.axvline(FLOOR, color="black", ls="--", lw=1, label=f"SiLU floor {FLOOR:.3f}")
ax.set(yscale="log", xlabel="feature value (activation units)",
       ylabel="count (timestep × dimension values)",
       title="Values of the SiLU-fed temporal features, all timesteps of the grid")
ax.legend(fontsize=8)
fig.tight_layout()
"""
    ),
    md(
        """
## Skew across timesteps, per dimension

Level **temporal_channel**: one dimension's T values across the timestep grid; level
**temporal_layer**: all T·D values of a layer at once. Left: the per-dimension skewness,
sorted, one line per distinct input. Right: the trajectories of the three most skewed
dimensions of one SiLU-fed input — look for dimensions that sit on the floor for most
timesteps and spike over a narrow band of t.
"""
    ),
    code(
        """
tcs = temporal_channel_skew(run.temporal, ROLE_OF)
tls = temporal_layer_skew(run.temporal, ROLE_OF)
tls[tls["layer"].isin(REPS)][["layer", "count", "min", "max", "mean", "skewness", "kurtosis"]]
"""
    ),
    code(
        """
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for n in REPS:
    s = np.sort(tcs.loc[tcs["layer"] == n, "skewness"].dropna().to_numpy())[::-1]
    axes[0].plot(np.arange(len(s)), s, label=n)
axes[0].axhline(0, color="grey", lw=1)
axes[0].set(xlabel="dimension rank (by skewness)",
            ylabel="skewness g1 across timesteps (dimensionless)")
axes[0].legend(fontsize=7)
if silu_fed:
    n = silu_fed[0]
    t, e = MATS[n]
    sk = tcs[tcs["layer"] == n].set_index("channel")["skewness"]
    for d in sk.nlargest(3).index:
        axes[1].plot(t, e[:, d], label=f"dim {d} (g1 = {sk[d]:.1f})")
    axes[1].axhline(FLOOR, color="black", ls="--", lw=1, label="SiLU floor")
    axes[1].set(xlabel="training timestep t", ylabel="feature value (activation units)", title=n)
    axes[1].title.set_fontsize(9)
    axes[1].legend(fontsize=8)
fig.tight_layout()
"""
    ),
    md(
        """
## Quantizing temporal features: TDScore and relative MSE

For each `time_emb` layer with features e_i (one per timestep of the grid) and its weight
W, y_i = W·e_i and ŷ_i = W·Q(e_i). **TDScore** is the mean over pairs of timesteps of
min(d̂_ij/d_ij, d_ij/d̂_ij) with d the distance between the outputs: 1 keeps every
distinction between timesteps as the consuming layer sees it, 0 collapses them.
**Relative MSE** ‖ŷ − y‖²/‖y‖² says how far the values move (a constant offset keeps
the distinctions but not the values); **collisions** count pairs of timesteps that become
identical. Quantizers: per-tensor min-max uniform, and signed power-of-two (log2), at 8,
6, 4 and 3 bits.

This is the one place a notebook touches the model: W comes from rebuilding it with the
run's weight seed and outlier knobs, checked against the weight statistics stored in the run.
"""
    ),
    code(
        """
from functools import partial

from qvd_bench.models.zoo import load_run_model

loaded = load_run_model(run)  # the same weights and outlier settings as the run
WEIGHTS = {n: loaded.denoiser.get_submodule(n).weight.detach().double() for n in names}
stored = run.weights.groupby("layer", observed=True)["absmax"].apply(np.asarray)
matches = [np.allclose(WEIGHTS[n].abs().amax(dim=1).numpy(), stored[n], rtol=1e-5) for n in names]
assert all(matches), "the rebuilt model does not match the run's weight statistics"
{n: tuple(w.shape) for n, w in WEIGHTS.items()}
"""
    ),
    code(
        """
QUANTIZERS = {"uniform": uniform_quantize, "log2": log2_quantize}
SILU_LAYERS = {m for r in silu_fed for m in groups[MATS[r][1].tobytes()]}
rows = []
for n in names:
    e = torch.from_numpy(MATS[n][1]).double()
    for bits in (8, 6, 4, 3):
        for qname, quantizer in QUANTIZERS.items():
            score = tdscore(e, WEIGHTS[n], partial(quantizer, bits=bits))
            rows.append({"layer": n, "input": "SiLU-fed" if n in SILU_LAYERS else "other",
                         "quantizer": qname, "bits": bits, **score})
td = pd.DataFrame(rows)
td.pivot_table(index=["input", "quantizer"], columns="bits",
               values=["tdscore", "relative_mse", "collisions"],
               aggfunc={"tdscore": "median", "relative_mse": "median", "collisions": "sum"})
"""
    ),
    code(
        """
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
kw = dict(data=td, x="bits", hue="quantizer", style="input", estimator="median",
          errorbar=("pi", 100), markers=True, dashes=True)
sns.lineplot(y="tdscore", ax=axes[0], **kw)
axes[0].set(ylabel="TDScore (1 = timesteps kept apart)", ylim=(0, 1.02))
sns.lineplot(y="relative_mse", ax=axes[1], **kw)
axes[1].set(yscale="log", ylabel="relative MSE ‖ŷ − y‖² / ‖y‖²")
for ax in axes:
    ax.set(xlabel="bits", xticks=[3, 4, 6, 8])
    ax.invert_xaxis()
axes[0].get_legend().remove()
axes[1].legend(bbox_to_anchor=(1.02, 1), loc="upper left")
fig.suptitle("Quantized temporal features as the consuming layer sees them "
             "(median and range over layers)")
fig.tight_layout()
"""
    ),
    md(
        """
What to look for: where TDScore stays high while the relative MSE grows, the quantizer
shifts values but keeps timesteps apart; where collisions appear, the consuming layer can
no longer tell some timesteps apart at all — for a temporal feature the worse failure.
Power-of-two levels do not get finer with more bits (they only reach smaller magnitudes),
so the log2 quantizer's error levels off instead of falling with the bit-width.
"""
    ),
    md(CLEANUP_MD),
    code(CLEANUP),
]


# ------------------------------------------------------------------ 03 channel coverage

NB03 = [
    md(
        f"""
# 03 · Channel ranges and quantization-level coverage

A per-tensor quantizer has one range [lo, hi] for all channels of a layer input. When
channel ranges differ a lot (inter-channel disparity) or sit on one side of zero
(asymmetry), most channels can only reach a few of the quantizer's levels. This notebook
looks at the per-channel ranges, their disparity and asymmetry, the share of levels each
channel can reach (coverage, analytic from min/max and empirical from sampled rows), and
how the ranges drift across timesteps.

For channel c with range r_c = max_c − min_c:

- asymmetry a_c = (max_c + min_c)/r_c (in [−1, 1] when the range contains 0);
- disparity of a layer = max_c r_c / median_c r_c, and the Gini coefficient of the r_c;
- coverage of a b-bit min-max quantizer = the share of its 2^b levels between q(min_c)
  and q(max_c).

{TINY_NOTE}
"""
    ),
    parameters(),
    code(IMPORTS),
    md(
        """
## The run

With `RUN = None` this collects a small run on `tiny-unet3d` into a temporary directory
(two prompts, six steps, 4×16×16 latents, 256 reservoir rows per layer) and loads it.
"""
    ),
    code(load_cell()),
    code(
        """
from qvd_bench.analysis.channels import (
    channel_ranges,
    coverage,
    coverage_summary,
    disparity,
    empirical_coverage,
    temporal_drift,
)
"""
    ),
    md(
        """
## Per-channel ranges: the worst layers by disparity

Ranges are over the whole run (all timesteps, both CFG branches), as a single calibrated
range would see them. The table lists the layers with the largest max/median range ratio;
the plot shows their channel ranges sorted, on a log scale: a few channels far above the
rest is the signature of outlier channels.
"""
    ),
    code(
        """
ranges = channel_ranges(run.channels)
disp = disparity(ranges)
worst = disp.sort_values("max_median_ratio", ascending=False)
worst.head(8)
"""
    ),
    code(
        """
fig, ax = plt.subplots(figsize=(8, 4))
for layer in worst["layer"].head(4):
    r = np.sort(ranges.loc[ranges["layer"] == layer, "range"].dropna().to_numpy())[::-1]
    ax.plot(np.arange(1, len(r) + 1), r, marker=".", label=f"{layer} ({ROLE_OF[layer]})")
ax.set(xscale="log", yscale="log", xlabel="channel rank (by range)",
       ylabel="channel range max − min (activation units)",
       title="Sorted per-channel ranges of the four layers with the largest disparity")
ax.legend(fontsize=7)
fig.tight_layout()
"""
    ),
    md("Disparity of every layer, by role (max/median ratio and Gini coefficient of the ranges):"),
    code(
        """
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
sns.stripplot(data=disp, x="role", y="max_median_ratio", order=ORDER, size=4, alpha=0.7, ax=axes[0])
axes[0].set(yscale="log", xlabel="layer role", ylabel="max / median channel range (ratio)")
sns.stripplot(data=disp, x="role", y="gini_range", order=ORDER, size=4, alpha=0.7, ax=axes[1])
axes[1].set(xlabel="layer role", ylabel="Gini coefficient of channel ranges (0 = equal)")
for ax in axes:
    ax.tick_params(axis="x", rotation=30)
fig.tight_layout()
"""
    ),
    md(
        """
## Asymmetry

a_c = (max_c + min_c)/(max_c − min_c): 0 for a channel centred on zero, ±1 when one end
of its range is at zero, and beyond ±1 when the channel does not cross zero at all (the
[−1, 1] bound holds only for ranges that contain 0). A zero-centred (symmetric) quantizer
leaves about half of its levels unused on channels with |a_c| near or above 1. The
violins are clipped to [−2, 2]; the table gives the shares.
"""
    ),
    code(
        """
fig, ax = plt.subplots(figsize=(9, 4))
clipped = ranges.assign(asymmetry=ranges["asymmetry"].clip(-2, 2))
sns.violinplot(data=clipped, x="role", y="asymmetry", order=ORDER, cut=0, inner="quartile",
               density_norm="width", ax=ax)
ax.axhline(1, color="grey", ls="--", lw=1)
ax.axhline(-1, color="grey", ls="--", lw=1)
ax.set(xlabel="layer role", ylabel="asymmetry (max + min)/(max − min), clipped")
ax.tick_params(axis="x", rotation=30)
fig.tight_layout()
a = ranges["asymmetry"].abs()
ranges.assign(**{"|a_c| > 0.5": a > 0.5, "does not cross 0 (|a_c| > 1)": a > 1}).groupby(
    "role", observed=True)[["|a_c| > 0.5", "does not cross 0 (|a_c| > 1)"]].mean().T
"""
    ),
    md(
        """
## Coverage at 8 and 4 bits

Each layer gets one min-max range over all its channels and the whole run. Coverage is
the share of that quantizer's levels a channel can reach; a channel under 10 % is
represented by a handful of levels. Left: per-channel coverage by role; right: share of
channels under 10 %.
"""
    ),
    code(
        """
cov = pd.concat([coverage(ranges, bits) for bits in (8, 4)], ignore_index=True)
# coverage at both bit-widths, summarised per (layer, bits)
summary = coverage_summary(cov, threshold=0.1)
per_role = (cov.dropna(subset=["coverage"])
            .assign(below=lambda d: d["coverage"] < 0.1)
            .groupby(["role", "bits"], observed=True)
            .agg(channels=("coverage", "size"), mean_coverage=("coverage", "mean"),
                 median_coverage=("coverage", "median"), share_below_10pct=("below", "mean")))
per_role.unstack("bits")
"""
    ),
    code(
        """
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
hue = dict(hue="bits", hue_order=[8, 4], palette=["C0", "C1"])
sns.boxplot(data=cov, x="role", y="coverage", order=ORDER, fliersize=1, ax=axes[0], **hue)
axes[0].axhline(0.1, color="grey", ls="--", lw=1)
axes[0].set(xlabel="layer role", ylabel="coverage (share of the 2^b levels)", ylim=(0, 1.02),
            title="Per-channel coverage, one min-max range per layer")
sns.barplot(data=per_role.reset_index(), x="role", y="share_below_10pct", order=ORDER,
            ax=axes[1], **hue)
axes[1].set(xlabel="layer role", ylabel="share of channels (fraction)", ylim=(0, 1),
            title="Channels with coverage under 10 %")
for ax in axes:
    ax.tick_params(axis="x", rotation=30)
fig.tight_layout()
"""
    ),
    md("The layers with the most starved channels at 4 bits:"),
    code(
        """
summary[summary["bits"] == 4].sort_values("share_below_threshold", ascending=False).head(8)
"""
    ),
    md(
        """
## Analytic vs empirical coverage

Analytic coverage counts the levels between a channel's min and max: an upper bound.
Empirical coverage counts the distinct levels the channel's values actually occupy in
the reservoir rows (a bottom-k sample of input rows, across timesteps and branches), with
the same [lo, hi]. The sample has at most as many rows as the reservoir capacity, so at
8 bits empirical coverage is limited by the sample size too; at 4 bits the gap shows how
much of a channel's reachable span its values really use (points below the diagonal:
values bunched inside the span). A `time_emb` layer gets one row per call, so its sample
is small.
"""
    ),
    code(
        """
picked = [disp[disp["role"] == r].sort_values("max_median_ratio")["layer"].iloc[-1]
          for r in ORDER if (disp["role"] == r).any()]
parts = []
for bits in (8, 4):
    c = cov[cov["bits"] == bits]
    for layer in picked:
        analytic = c[c["layer"] == layer]
        lo, hi = analytic["lo"].iloc[0], analytic["hi"].iloc[0]
        emp = empirical_coverage(run.reservoir[layer]["rows"], bits, lo, hi)
        keep = analytic[["layer", "role", "channel", "bits", "coverage"]]
        parts.append(keep.merge(emp, on="channel"))
emp_vs = pd.concat(parts, ignore_index=True)
means = emp_vs.groupby(["layer", "role", "bits"], observed=True)
means[["rows", "coverage", "empirical_coverage"]].mean().unstack("bits")
"""
    ),
    code(
        """
grid = sns.relplot(data=emp_vs, x="coverage", y="empirical_coverage", hue="role", hue_order=ORDER,
                   col="bits", s=18, alpha=0.7, height=3.8,
                   facet_kws={"sharex": False, "sharey": False})
for ax in grid.axes.flat:
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax.set(xlabel="analytic coverage (min/max span)", ylabel="empirical coverage (reservoir rows)")
grid.figure.suptitle("Per-channel coverage, most disparate layer of each role", y=1.03);
"""
    ),
    md(
        """
## Temporal drift of ranges

The per-step range of a layer R_t = max over channels of max_c,t − min over channels of
min_c,t; drift = max_t R_t / min_t R_t. A drift well above 1 means a single range
calibrated over all timesteps is too wide for some of them. Left: drift of every layer by
role; right: R_t of the four layers with the largest drift.
"""
    ),
    code(
        """
drift = temporal_drift(run.channels)
step_ranges = channel_ranges(run.channels, per_timestep=True)
per_step = (step_ranges.groupby(["layer", "role", "timestep"], observed=True)
            .agg(lo=("min", "min"), hi=("max", "max")).reset_index())
per_step["step_range"] = per_step["hi"] - per_step["lo"]
top_drift = drift.sort_values("drift", ascending=False).head(4)
top_drift
"""
    ),
    code(
        """
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
sns.stripplot(data=drift, x="role", y="drift", order=ORDER, size=4, alpha=0.7, ax=axes[0])
axes[0].set(xlabel="layer role", ylabel="drift max_t R_t / min_t R_t (ratio)")
axes[0].tick_params(axis="x", rotation=30)
for layer in top_drift["layer"]:
    s = per_step[per_step["layer"] == layer]
    axes[1].plot(s["timestep"], s["step_range"], marker="o", label=f"{layer} ({ROLE_OF[layer]})")
axes[1].invert_xaxis()
axes[1].set(yscale="log", xlabel="timestep t (sampling runs left to right)",
            ylabel="layer range R_t (activation units)")
axes[1].legend(fontsize=7)
fig.tight_layout()
"""
    ),
    md(
        """
What drift costs, at 4 bits: the share of (channel, timestep) pairs under 10 % coverage
with one range for the whole run, against a range calibrated per timestep. `time_emb`
layers are left out: within a timestep each of their channels is a single value (one
level).
"""
    ),
    code(
        """
step_ranges = step_ranges[step_ranges["role"] != "time_emb"]
bounds = ranges.groupby("layer", observed=True).agg(lo=("min", "min"), hi=("max", "max"))
whole_run = {layer: (b["lo"], b["hi"]) for layer, b in bounds.iterrows()}


def starved(cov4):
    return (cov4["coverage"] < 0.1).groupby(cov4["role"], observed=True).mean()


pd.DataFrame({
    "one range for the run": starved(coverage(step_ranges, 4, quant_range=whole_run)),
    "one range per timestep": starved(coverage(step_ranges, 4)),
}).T
"""
    ),
    md(CLEANUP_MD),
    code(CLEANUP),
]


# ------------------------------------------------------------------ 04 bring your own pipeline

NB04 = [
    md(
        f"""
# 04 · Bring your own pipeline

The whole workflow on a diffusers pipeline object already in memory — statistics,
analysis, quantization, fidelity, figures — with the package's top-level API:

```python
run = qvd_bench.collect(pipe, prompts, steps=..., out=...)
record = qvd_bench.quantize_(pipe, qvd_bench.QuantConfig(...), stats=run)
table = qvd_bench.fidelity(pipe, record, prompts, ...)
```

The pipeline samples with its own call (its text encoder, scheduler and conditioning);
every denoiser of it is hooked and quantized (both experts of a two-expert Wan 2.2). Here
the pipeline is a `WanPipeline` built in memory from tiny configs (random weights, a tiny
VAE, text encoder and tokenizer); any loaded pipeline, e.g.
`WanPipeline.from_pretrained(...)`, goes the same way. Sizes are latent sizes.

{TINY_NOTE}
"""
    ),
    code(
        """
import tempfile

from IPython.display import Image

import qvd_bench
from qvd_bench.analysis.summary import analyze
from qvd_bench.models.pipelines import build_tiny_pipeline
from qvd_bench.report import render, results

OUT = tempfile.TemporaryDirectory(prefix="qvd-bench-")  # removed in the last cell
"""
    ),
    md("## The pipeline, and its statistics"),
    code(
        """
pipe = build_tiny_pipeline("tiny-wan")  # or any diffusers video pipeline object
prompts = ["a red ball rolls across a wooden table", "a cat jumps onto a sofa"]
sampling = dict(steps=4, guidance_scale=5.0, frames=2, height=8, width=8)
run = qvd_bench.collect(pipe, prompts, out=f"{OUT.name}/run", temporal_stride=50, **sampling)
"""
    ),
    md(
        """
## Analysis

What each layer's inputs look like (``analysis.parquet``), and the plan decided from it
(``plan.json``), both stored beside the statistics.
"""
    ),
    code(
        'analyze(run.path)[0].groupby("role")[["skew_abs_max", "kurtosis_abs_max", "disparity"]].max()'
    ),
    md(
        """
## Quantize in place, and fidelity against the same pipeline in full precision

`fidelity` takes the record back (`unquantize_`) for the FP reference, samples it, and
applies the record again: the pipeline is left quantized. Teacher-forced rows replay every
FP denoiser call into the quantized denoiser; free-running rows compare final latents.
"""
    ),
    code(
        """
record = qvd_bench.quantize_(pipe, qvd_bench.QuantConfig("qvd", w_bits=8, a_bits=8), stats=run)
table = qvd_bench.fidelity(pipe, record, prompts, **sampling)
table[table["step"] == -1].pivot_table(index=["mode", "branch"], columns="metric", values="value")
"""
    ),
    md("## Figures: one of the statistics report's, and SQNR per step"),
    code(
        """
figures, notes = render.run_figures(run)
Image(results.figure_png(figures[0].figure))
"""
    ),
    code("Image(results.figure_png(results.sqnr_per_step(table)))"),
    md("## Clean up\n\nRemoves the temporary run."),
    code("OUT.cleanup()"),
]

NOTEBOOKS = {
    "01_activation_distributions.ipynb": NB01,
    "02_temporal_features.ipynb": NB02,
    "03_channel_coverage.ipynb": NB03,
    "04_bring_your_own_pipeline.ipynb": NB04,
}


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids keep diffs small
    nbformat.validate(nb)
    return nb


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, cells in NOTEBOOKS.items():
        text = nbformat.writes(build(cells)) + "\n"
        path = HERE / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("out of date (run python notebooks/_build.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
