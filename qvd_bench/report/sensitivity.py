"""The sensitivity report: a ranked table of units and a figure of the most sensitive.

It reads the table ``evaluate.sensitivity.sensitivity`` returns (one row per unit:
``unit``, ``kind`` ("model", "role" or "layer"), ``role``, ``layers``, ``method``,
``w_bits``, ``a_bits``, ``sqnr_db``, ``noise``, ``rank``) — plain data, so reports need
nothing from evaluation. A multi-expert model's table has an ``expert`` column: its
layers are then also shown with the experts side by side, and coloured by expert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from qvd_bench.report import cost as report_cost
from qvd_bench.report.render import (
    TINY_NOTE,
    FigureBlock,
    Heading,
    Notice,
    Paragraph,
    Table,
    expert_parts,
    experts_side_by_side,
    write_report,
)
from qvd_bench.report.results import figure_png
from qvd_bench.store import atomic_write, write_json

BAR_COLOUR = "#4c72b0"
# Bar colours of the experts of a multi-expert model, in order.
EXPERT_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
RANDOM_WEIGHTS_NOTE = (
    "This model has random weights: the ranking shows which units this initialisation "
    "makes sensitive, not which are sensitive in a trained model. " + TINY_NOTE
)


def sensitivity_figure(table: pd.DataFrame, top: int = 20):
    """Horizontal bars of the ``top`` most sensitive layers and every role (sqnr_db)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("layer", "role") if (table["kind"] == k).any()]
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(6.5 * len(kinds), 0.32 * top + 1.5), squeeze=False
    )
    experts = table_experts(table)
    colours = dict(zip(experts, EXPERT_COLOURS))
    for ax, kind in zip(axes[0], kinds):
        part = table[table["kind"] == kind].sort_values("rank").head(top)
        labels = [_short(u) for u in part["unit"]]
        colour = [colours.get(e, BAR_COLOUR) for e in part.get("expert", [""] * len(part))]
        ax.barh(labels[::-1], part["sqnr_db"].to_numpy()[::-1], color=colour[::-1])
        if kind == "layer" and experts:  # one colour per expert, its name in the legend
            from matplotlib.patches import Patch

            handles = [Patch(color=colours[e], label=e) for e in experts]
            ax.legend(handles=handles, title="expert", fontsize=7, loc="best")
        # Two short lines: one long line is cut at the figure's edge.
        ax.set_xlabel("SQNR, only this unit quantized (dB)\nlower = more sensitive")
        ax.set_title(f"most sensitive {kind}s")
        ax.tick_params(axis="y", labelsize=7)
    model = table[table["kind"] == "model"]
    if len(model):
        title = f"{model['method'].iloc[0]} W{model['w_bits'].iloc[0]}A{model['a_bits'].iloc[0]}"
        fig.suptitle(f"{title}: every layer quantized {model['sqnr_db'].iloc[0]:.1f} dB")
    fig.tight_layout()
    return fig


def table_experts(table: pd.DataFrame) -> list[str]:
    """The experts of a multi-expert model's sensitivity table (its ``expert`` column);
    empty for one denoiser. Sorted: the pipeline attributes sort in the pipeline's order
    (``transformer``, ``transformer_2``), whereas the rows are in order of sensitivity."""
    if "expert" not in table.columns:
        return []
    return sorted(e for e in set(table["expert"]) if e)


def experts_layer_table(table: pd.DataFrame) -> pd.DataFrame:
    """The layer units with the experts side by side: one row per layer name inside an
    expert and role, each expert's SQNR and rank next to each other."""
    layers = table[table["kind"] == "layer"][["unit", "role", "sqnr_db", "rank"]]
    experts = table_experts(table)
    parts = expert_parts(layers.rename(columns={"unit": "layer"}), "layer", experts)
    return experts_side_by_side(parts, ["layer", "role"])


def experts_role_table(table: pd.DataFrame) -> pd.DataFrame:
    """The roles measured in each expert alone, the experts side by side: one row per
    role, each expert's layers, SQNR and rank (among that expert's roles) next to each
    other."""
    roles = table[(table["kind"] == "role") & (table["expert"] != "")]
    parts = {
        expert: roles[roles["expert"] == expert][["role", "layers", "sqnr_db", "rank"]]
        for expert in table_experts(table)
    }
    return experts_side_by_side(parts, ["role"])


def _random_weights(table: pd.DataFrame) -> bool:
    """Whether the model of a sensitivity table had random weights (``random_weights``
    column, when the caller recorded it; tiny presets and configs without weights do)."""
    return "random_weights" in table.columns and bool(table["random_weights"].any())


def _short(name: str, keep: int = 44) -> str:
    return name if len(name) <= keep else "…" + name[-(keep - 1) :]


def write_sensitivity_report(
    table: pd.DataFrame,
    out_dir: str | Path,
    title: str,
    top: int = 20,
    *,
    random_weights: bool | None = None,
    cost: Sequence[Mapping] = (),
) -> Path:
    """``sensitivity.parquet`` and a report (ranked tables, figure) in ``out_dir``.

    Args:
        table: the sensitivity table.
        out_dir: the report directory.
        title: the report title.
        top: how many layers the figure shows.
        random_weights: whether the model had random weights (a notice says what that
            means for the ranking); None reads the table's ``random_weights`` column.
        cost: ``StageCost.to_dict()`` per stage; written to ``cost.json`` and shown as a
            table.
    """
    out_dir = Path(out_dir)
    if random_weights is None:
        random_weights = _random_weights(table)
    blocks: list = [Heading(title, level=1)]
    if random_weights:
        blocks.append(Notice(RANDOM_WEIGHTS_NOTE))
    blocks += [
        Paragraph(
            "Each unit is quantized alone, everything else in full precision; the figure is "
            "the end-to-end SQNR (teacher-forced, CFG-combined, x0-space) the model falls "
            "to. Lower means more sensitive; noise is 10^(−SQNR/10)."
        ),
        FigureBlock(
            "sensitivity.png",
            figure_png(sensitivity_figure(table, top)),
            f"The {top} most sensitive layers and every role.",
        ),
    ]
    for kind in ("model", "role", "layer"):
        part = table[table["kind"] == kind]
        if len(part):
            blocks.append(Table(f"By {kind}", part, collapsed=kind == "layer"))
    if table_experts(table):
        side_by_side = experts_role_table(table)
        if len(side_by_side):
            blocks.append(
                Table(
                    "By role, experts side by side",
                    side_by_side,
                    "Each role of each expert quantized alone (rank among that expert's "
                    "roles); the roles without an expert above span every expert.",
                )
            )
        blocks.append(
            Table(
                "By layer, experts side by side",
                experts_layer_table(table),
                "Each layer of each expert quantized alone: the same layer of the two "
                "experts on one row (rank among all layers).",
            )
        )
    blocks += [Table(*table) for table in report_cost.stage_tables(cost)]
    index = write_report(blocks, title, out_dir)
    atomic_write(out_dir / "sensitivity.parquet", lambda p: table.to_parquet(p, index=False))
    if cost:
        write_json(out_dir / "cost.json", {"stages": list(cost)})
    return index
