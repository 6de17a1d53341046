"""Every figure renders from a synthetic panel, with consistent colours, log-x, titles and error bars."""
from __future__ import annotations

import matplotlib.colors as mcolors
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

from analysis import plots
from analysis.aggregate import panels

FIGS = [plots.fig_accuracy_vs_params, plots.fig_memory_pareto, plots.fig_cost_vs_lora,
        plots.fig_per_dataset, plots.fig_delta_rank]


@pytest.fixture(scope="module")
def clip_panel(sweep_df):
    return sweep_df[sweep_df.task == "clip"]


@pytest.mark.parametrize("fn", FIGS, ids=lambda f: f.__name__)
def test_each_figure_renders_with_title(fn, clip_panel, tmp_path):
    fig = fn(clip_panel)
    assert isinstance(fig, Figure)
    text = " ".join([a.get_title() for a in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""])
    assert "clip" in text and "tiny-clip" in text and "16-shot" in text
    fig.savefig(tmp_path / "f.png", dpi=72)
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert fig.get_figwidth() <= 7.5


def _line_colors(fig: Figure) -> dict[str, str]:
    """Legend label -> colour of its artist (line, error-bar, scatter or bar)."""
    out = {}
    for ax in fig.axes:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            if isinstance(handle, ErrorbarContainer):
                rgba = handle.lines[0].get_color()
            elif isinstance(handle, BarContainer):
                rgba = handle.patches[0].get_facecolor()
            elif hasattr(handle, "get_facecolor"):
                rgba = handle.get_facecolor()[0]
            else:
                rgba = handle.get_color()
            out[name] = mcolors.to_hex(rgba)
    return out


def test_styles_come_from_the_data_in_display_order(clip_panel):
    styles = plots.method_styles(clip_panel)
    assert list(styles) == ["lora", "loha", "lokr", "randlora", "full", "none"]
    # the colours figures always had
    assert [s.color for s in styles.values()][:4] == plots.ADAPTER_COLORS[:4]
    assert [s.label for s in styles.values()] == ["LoRA", "LoHa", "LoKr", "RandLoRA", "Full FT", "Head-only"]
    assert {s.kind for s in styles.values()} == {"adapter", "reference"}
    assert len({(s.color, s.marker) for s in styles.values()}) == len(styles)   # every method distinct


def test_accuracy_figure_lines_colours_log_x(clip_panel):
    fig = plots.fig_accuracy_vs_params(clip_panel)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "parameters" in ax.get_xlabel() and "%" in ax.get_ylabel()
    colors, styles = _line_colors(fig), plots.method_styles(clip_panel)
    for method in ("lora", "loha", "lokr", "randlora"):
        assert colors[styles[method].label] == styles[method].color
    assert any(k.startswith("Full FT") for k in colors) and any(k.startswith("Head-only") for k in colors)
    assert fig.legends, "legend missing"
    assert ax.containers and all(c.has_yerr for c in ax.containers)  # 3 seeds -> error bars


def test_no_error_bars_with_one_seed(sweep_df):
    one = sweep_df[(sweep_df.task == "vision") & (sweep_df.seed == 0)]
    ax = plots.fig_accuracy_vs_params(one).axes[0]
    assert not any(c.has_yerr for c in ax.containers)


def test_memory_figure_labels_which_memory(sweep_df):
    cpu = plots.fig_memory_pareto(sweep_df[sweep_df.task == "clip"]).axes[0].get_xlabel()
    gpu = plots.fig_memory_pareto(sweep_df[sweep_df.task == "vision"]).axes[0].get_xlabel()
    assert "RSS" in cpu and "CPU" in cpu and "GPU" in gpu and "MiB" in gpu


def test_same_colour_for_a_method_in_every_figure(clip_panel):
    styles = plots.method_styles(clip_panel)
    seen = [_line_colors(fn(clip_panel)) for fn in FIGS if fn is not plots.fig_per_dataset]
    for method in ("lora", "loha", "lokr", "randlora"):
        assert {c[styles[method].label] for c in seen} == {styles[method].color}
    ticks = plots.fig_per_dataset(clip_panel).axes[0].get_yticklabels()
    assert {mcolors.to_hex(t.get_color()) for t in ticks if t.get_text().startswith("RandLoRA")} == {
        styles["randlora"].color}


def test_figures_refuse_several_panels(sweep_df):
    with pytest.raises(ValueError, match="one panel"):
        plots.fig_accuracy_vs_params(sweep_df)
    assert len(panels(sweep_df)) == 2


def test_human_ticks():
    assert [plots.human(x) for x in (512, 18432, 5.6e6, 2e9)] == ["512", "18.4k", "5.6M", "2G"]


def test_points_off_their_budget_are_drawn_hollow_and_named(clip_panel):
    """A setting whose run missed its budget (params.budget_reached false) is marked, never drawn as equal."""
    def hollow(fig):
        return [ln for ln in fig.axes[0].get_lines() if "budget not reached" in str(ln.get_label())]

    assert not hollow(plots.fig_accuracy_vs_params(clip_panel))  # every budget reached (or not recorded)
    df = clip_panel.copy()
    budget = df.loc[df.method == "lokr", "budget_target"].dropna().max()
    df["budget_reached"] = ~((df.method == "lokr") & (df.budget_target == budget))
    fig = plots.fig_accuracy_vs_params(df)
    lines = hollow(fig)
    assert len(lines) == 1 and lines[0].get_label().startswith("LoKr")
    assert lines[0].get_markerfacecolor() == "white"
    lokr = df[(df.method == "lokr") & (df.budget_target == budget)].drop_duplicates("source")
    assert list(lines[0].get_xdata()) == pytest.approx([lokr["trainable_params"].mean()])
    assert any("budget not reached" in t.get_text() for leg in fig.legends for t in leg.get_texts())


# ------------------------------------------------------------------ one budget, two seeds (the small-n case)


@pytest.fixture(scope="module")
def one_budget_two_seeds(clip_panel):
    """One budget whose methods' solved counts lie within 0.3% of each other (as the solver's do), two seeds
    10 points apart: a 95% t-interval at n=2 (t = 12.7) is far wider than the accuracy axis."""
    budget = clip_panel["budget_target"].dropna().max()
    df = clip_panel[(clip_panel.budget_target.isna() | (clip_panel.budget_target == budget))
                    & clip_panel.seed.isin([0, 1])].copy()
    offsets = {"lora": 0, "loha": 120, "lokr": 250, "randlora": 330}
    adapters = df.method.isin(list(offsets))
    df.loc[adapters, "trainable_params"] = 115_000 + df.loc[adapters, "method"].map(offsets)
    df.loc[df.seed == 1, "mean_accuracy"] += 0.10
    return df


def _visible_labels(ax) -> list[str]:
    fig = ax.figure
    fig.canvas.draw()
    lo, hi = sorted(ax.get_xlim())
    ticks = zip(ax.get_xticks(), ax.get_xticklabels(), strict=True)
    return [t.get_text() for x, t in ticks if lo <= x <= hi and t.get_text()]


@pytest.mark.parametrize("fn", [plots.fig_accuracy_vs_params, plots.fig_delta_rank], ids=lambda f: f.__name__)
def test_one_budget_gets_one_labelled_tick(fn, one_budget_two_seeds):
    for ax in fn(one_budget_two_seeds).axes:
        labels = _visible_labels(ax)
        assert len(labels) == 1 and labels[0].endswith("k"), labels


@pytest.mark.parametrize("fn", [plots.fig_accuracy_vs_params, plots.fig_delta_rank], ids=lambda f: f.__name__)
def test_tick_labels_never_repeat(fn, clip_panel):
    for ax in fn(clip_panel).axes:
        labels = _visible_labels(ax)
        assert len(labels) >= 2 and len(set(labels)) == len(labels), labels


def test_distinct_labels_gain_digits_only_where_needed():
    fmt = plots.DistinctHumanFormatter()
    assert fmt.format_ticks([20_000, 50_000]) == ["20k", "50k"]
    assert fmt.format_ticks([115_000, 115_200, 115_400]) == ["115k", "115.2k", "115.4k"]
    assert plots.roundest_inside(111_000, 112_400) == 112_000 and plots.roundest_inside(0.9, 1.2) == 1


def _bar_extent(ax) -> tuple[float, float]:
    ys = [y for c in ax.containers for seg in c.lines[2][0].get_segments() for _, y in seg]
    return min(ys), max(ys)


def test_intervals_wider_than_the_axis_are_cut_marked_and_named(one_budget_two_seeds):
    ax = plots.fig_accuracy_vs_params(one_budget_two_seeds).axes[0]
    lo, hi = ax.get_ylim()
    assert lo <= _bar_extent(ax)[0] and _bar_extent(ax)[1] <= hi  # cut at the axis, never past it
    arrows = [ln for ln in ax.get_lines() if ln.get_label() == "_cut"]
    assert {ln.get_marker() for ln in arrows} == {"^", "v"}
    assert sum(len(ln.get_xdata()) for ln in arrows) == 8  # both ends of 4 adapters' bars
    labels = ax.get_legend_handles_labels()[1]
    assert "95% t-interval (n=2)" in labels and "cut at the axis" in labels


def test_intervals_inside_the_axis_are_drawn_whole(clip_panel):
    ax = plots.fig_accuracy_vs_params(clip_panel).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "95% t-interval (n=2-3)" in labels  # the failed seed of one setting leaves it n=2
    assert "cut at the axis" not in labels and not [ln for ln in ax.get_lines() if ln.get_label() == "_cut"]
