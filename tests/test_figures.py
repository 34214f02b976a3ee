"""The figures of `cbs fit` read back from the matplotlib Figures the figure functions return (ticks, labels,
titles, legends) and from the PNGs `cbs fit` writes: readable at a glance."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from test_analysis_branched import make_branched_study
from test_analysis_cli import BATCHES, BUDGETS, MODELS, make_study, target_loss
from test_analysis_noise import make_sweep

from cbs.analysis.branched import read_branched
from cbs.analysis.branched_figures import branched_figures
from cbs.analysis.branched_fit import fit_branched
from cbs.analysis.cli import fit_main
from cbs.analysis.figures import figure_b_simple, study_figures
from cbs.analysis.steps import load_steps
from cbs.analysis.study_fit import fit_study


def shown_ticklabels(axis) -> list:
    """The major tick labels inside the axis' view (matplotlib keeps labels of ticks outside it, undrawn)."""
    axis.figure.canvas.draw()
    lo, hi = sorted(axis.get_view_interval())
    return [t for t, v in zip(axis.get_ticklabels(), axis.get_ticklocs()) if lo <= v <= hi]


def tick_labels(axis) -> list[str]:
    return [t.get_text() for t in shown_ticklabels(axis)]


def legend_texts(fig) -> list[str]:
    return [t.get_text() for leg in fig.legends + [a.get_legend() for a in fig.axes if a.get_legend()]
            for t in leg.get_texts()]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    study, _ = make_study(root / "study")
    fit = fit_study(load_steps(str(study), "ewa"), n_resamples=50)
    figs = study_figures(fit.table, fit.estimates, fit.laws.cbs, fit.laws.b_noise, fit.overhead, fit.b_simple)
    return root, study, fit, figs


def test_steps_figure_ticks_the_batches_tried_and_titles_the_model_tokens_and_target(sweep):
    _, _, _, figs = sweep
    ax = figs["figures/steps_m85M_d1.png"].axes[0]
    assert tick_labels(ax.xaxis) == [f"{b:,}" for b in BATCHES]  # 32 ... 1,024, not 10^2, 10^3
    assert all(t.replace(",", "").isdigit() for t in tick_labels(ax.yaxis)) and len(tick_labels(ax.yaxis)) >= 3
    title = ax.get_title()
    assert title.startswith("85M-param model, 1B tokens") and f"target loss {target_loss('m85M', 'd1'):.4g}" in title
    assert "m85M_d1" not in title


def test_normalised_figure_has_batch_ticks_power_of_two_ratios_and_no_s_min_clash(sweep):
    _, _, _, figs = sweep
    ax = figs["figures/steps_normalized.png"].axes[0]
    assert tick_labels(ax.xaxis) == [f"{b:,}" for b in BATCHES]
    ys = tick_labels(ax.yaxis)
    assert ys[-1] == "1" and "1/2" in ys and all(y == "1" or y.startswith("1/") for y in ys)  # no 2.5, 3.5
    assert "S_min" not in ax.get_ylabel() and "B_min" not in ax.get_ylabel()
    labels = legend_texts(figs["figures/steps_normalized.png"])
    assert "85M-param model, 4B tokens, target 3.8" in labels and "perfect linear scaling" in labels


def test_law_figure_ticks_the_budgets_and_gives_r2_with_n(sweep):
    _, _, fit, figs = sweep
    fig = figs["figures/cbs_vs_tokens.png"]
    assert tick_labels(fig.axes[0].xaxis) == ["1B", "4B"]
    law = fit.laws.cbs["tokens"]
    assert law.n_points == 4 and f"CBS = {law.coefficient:.3g} D^{law.exponent:.3f} (R2={law.r2:.2f}, n=4)" \
        in legend_texts(fig)
    assert "data tokens D" in fig.axes[0].get_title()
    compute = tick_labels(figs["figures/cbs_vs_compute.png"].axes[0].xaxis)
    assert len(compute) == 4 and all(re.fullmatch(r"\d(\.\d+)?e1[5-9]", t) for t in compute), compute  # 5.1e17


def test_a_law_through_two_points_says_so_instead_of_r2(tmp_path):
    # one model, two budgets: the D law has as many points as parameters and fits them exactly
    study = make_sweep(tmp_path / "study")
    fit = fit_study(load_steps(str(study), "ewa"), n_resamples=0)
    law = fit.laws.cbs["tokens"]
    assert law.n_points == 2 and law.df_resid == 0
    figs = study_figures(fit.table, fit.estimates, fit.laws.cbs, fit.laws.b_noise, fit.overhead, fit.b_simple)
    texts = legend_texts(figs["figures/cbs_vs_tokens.png"])
    assert any(t.startswith("CBS = ") and t.endswith("(exact through 2 points)") for t in texts)
    assert not any("R2" in t for t in texts)


def test_b_simple_figure_names_the_setting_it_leaves_out_and_why(tmp_path):
    study = make_sweep(tmp_path / "study")
    fit = fit_study(load_steps(str(study), "ewa"), n_resamples=0)
    assert set(fit.b_simple) == {"d1", "d2"}
    ax = figure_b_simple(fit.estimates, {"d1": fit.b_simple["d1"]}).axes[0]
    assert len(tick_labels(ax.xaxis)) >= 2 and len(tick_labels(ax.yaxis)) >= 2  # not a lone "100"
    label = ax.get_xlabel()
    assert "not shown: 85M-param model, 16.4M tokens (no B_simple logged near its 16.4M tokens)" in label
    full = figure_b_simple(fit.estimates, fit.b_simple).axes[0].get_xlabel()
    assert "not shown" not in full


def test_every_text_lies_inside_the_figure(sweep):
    _, _, _, figs = sweep
    for path, fig in figs.items():
        fig.canvas.draw()
        renderer, box = fig.canvas.get_renderer(), fig.bbox
        ax = fig.axes[0]
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *shown_ticklabels(ax.xaxis), *shown_ticklabels(ax.yaxis),
                 *fig.legends]
        for t in texts:
            if t.get_visible() and (not hasattr(t, "get_text") or t.get_text()):
                e = t.get_window_extent(renderer)
                assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1 and box.y0 - 1 <= e.y0 and e.y1 <= box.y1 + 1, \
                    (path, getattr(t, "get_text", lambda: "legend")())


def test_written_pngs_are_large_with_legible_legends_and_nothing_cut_at_the_edge(sweep):
    import matplotlib.image

    root, study, _, figs = sweep
    assert fit_main([str(study), "--out", str(root / "fit"), "--bootstrap", "0"]) == 0
    pngs = sorted((root / "fit" / "figures").glob("*.png"))
    assert len(pngs) == 5 + len(MODELS) * len(BUDGETS)
    for p in pngs:
        image = matplotlib.image.imread(io.BytesIO(p.read_bytes()))
        assert image.shape[1] >= 900 and image.shape[0] >= 600, p.name
        # a label cut by the image edge leaves ink in its outermost pixel column or row
        edges = np.concatenate([image[:, 0, :3], image[:, -1, :3], image[0, :, :3], image[-1, :, :3]])
        assert edges.min() > 0.9, p.name
    for fig in figs.values():
        assert fig.legends and all(t.get_fontsize() >= 9 for leg in fig.legends for t in leg.get_texts())


def test_branched_figures_tick_the_branch_points_and_the_batches(tmp_path):
    study = make_branched_study(tmp_path / "study")
    figs = branched_figures(fit_branched(read_branched(study, "ewa")))
    ax = figs["figures/cbs_curve.png"].axes[0]
    assert tick_labels(ax.xaxis) == ["8.06K", "16K", "32K", "64K"]  # the branch points, not one "100,000"
    assert tick_labels(ax.yaxis) == ["4", "8", "16", "32"]
    losses = figs["figures/branches_mL2d128_d64K.png"]
    assert tick_labels(losses.axes[0].xaxis) == ["8", "16", "32"]
    assert losses.axes[0].get_title().startswith("393K-param model, 64K tokens")
    assert "branch point t = 64K tokens: CBS 16" in legend_texts(losses)
