"""report/index.html: the embedded data, column roles and directions, and the page as Chromium renders it.

The browser tests load the page from disk in headless Chromium (`--dump-dom`), drive it through URL hash
parameters (no browser driver needed) and compare what it shows with the same aggregation done in pandas.
"""
from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import tomllib

from analysis import leaderboard
from analysis.leaderboard import (
    FILTER_COLUMNS,
    column_roles,
    leaderboard_data,
    metric_direction,
    write_leaderboard,
)
from analysis.report import leaderboard_runs

ACC, PARAMS = "accuracy", "trainable"  # runs.csv's names (analysis/report.py RUN_COLUMNS)
DATA_RE = re.compile(r'<script type="application/json" id="leaderboard-data">(.*?)</script>', re.DOTALL)


def _embedded(page: Path) -> dict:
    return json.loads(DATA_RE.search(page.read_text()).group(1))


@pytest.fixture(scope="module")
def runs(sweep_df) -> pd.DataFrame:
    return leaderboard_runs(sweep_df)


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("leaderboard")
    figures = [out / "fig_a.png", out / "sub" / "fig_b.png"]
    for f in figures:
        f.parent.mkdir(exist_ok=True)
        plt.imsave(f, np.zeros((2, 2, 3)))
    return write_leaderboard(runs, out, figures, {"fig_a.png": "Figure A caption"})


# ------------------------------------------------------------------------------------- pure Python


def test_embedded_json_round_trips_to_the_runs_table(runs, page):
    data = _embedded(page)
    assert [c["name"] for c in data["columns"]] == list(runs.columns)
    expected = runs.astype(object).where(runs.notna(), None)  # missing values travel as null
    assert data["rows"] == expected.to_dict("records")
    assert data["figures"] == [{"src": "fig_a.png", "caption": "Figure A caption"},
                               {"src": "sub/fig_b.png", "caption": "fig b"}]


def test_a_value_cannot_close_the_script_tag(tmp_path):
    evil = "</script><script>alert(1)</script><!--"
    runs = pd.DataFrame({"method": [evil, "lora"], "task": ["t", "t"], "accuracy": [0.5, 0.6]})
    page = write_leaderboard(runs, tmp_path, [])
    text = page.read_text()
    assert text.count("</script>") == 2  # the data block's and the code block's own closing tags
    assert evil not in text
    assert _embedded(page)["rows"][0]["method"] == evil


def test_cells_become_plain_json_values():
    runs = pd.DataFrame({"method": ["a"], "revisions": [{"ds": "abc"}], "x": [float("inf")],
                         "n": [np.int64(2)]})
    row = leaderboard_data(runs)["rows"][0]
    assert row == {"method": "a", "revisions": '{"ds": "abc"}', "x": None, "n": 2}
    assert type(row["n"]) is int


@pytest.mark.parametrize("name, direction", [
    ("mean_accuracy", "max"), ("accuracy_before", "max"), ("samples_per_s", "max"),
    ("step_time_s", "min"), ("train_time_s", "min"), ("peak_rss_bytes", "min"), ("peak_mem_bytes", "min"),
    ("trainable_params", "min"), ("forgetting", "min"), ("budget_error", None), ("dw_rank_frac", None),
    ("something_else", None)])
def test_metric_direction(name, direction):
    assert metric_direction(name) == direction


def test_column_roles_and_directions_reach_the_page(runs, page):
    roles = column_roles(runs)
    assert {roles[c] for c in ("method", "task", "dataset", "budget", "lr", "device")} == {"key"}
    assert {roles[c] for c in ("run_id", "seed", "status", "source")} == {"run"}
    assert roles[ACC] == roles["step_time_s"] == "metric"
    columns = {c["name"]: c for c in _embedded(page)["columns"]}
    assert columns[ACC]["direction"] == "max" and columns["peak_rss_bytes"]["direction"] == "min"
    assert columns["method"]["direction"] is None


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"method": []}), "runs table is empty"),
    (pd.DataFrame({"task": ["clip"], "accuracy": [0.5]}), "needs a 'method' column; it has: task, accuracy"),
])
def test_bad_input_is_one_clear_error(frame, message):
    with pytest.raises(ValueError, match=message):
        leaderboard_data(frame)


def test_the_page_is_one_file_built_from_the_shipped_assets(page):
    """The style and script come from analysis/assets/ and are inlined: the page loads nothing else."""
    text, assets = page.read_text(), Path(leaderboard.__file__).parent / "assets"
    for name in ("leaderboard.css", "leaderboard.js"):
        assert (assets / name).read_text() in text, name
    assert not re.search(r"<(?:link|script)[^>]*\b(?:href|src)=", text)  # no external style or script
    assert not re.search(r"\{(?:title|css|data|js)\}", text)  # every placeholder filled


def test_pyproject_ships_the_assets_as_package_data():
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {f for pattern in patterns["analysis"] for f in (root / "analysis").glob(pattern)}
    assert {f for f in (root / "analysis" / "assets").iterdir()} <= shipped


# ----------------------------------------------------------------------------------------- browser


def _find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class ChromiumUnavailable(RuntimeError):
    """Chromium is not here and cannot be installed; the message is the skip reason."""


def ensure_chromium(timeout: float = 900) -> str:
    """Debian's Chromium; apt-get installs it when absent and we are root (a fresh CI machine)."""
    found = _find_chromium()
    if found:
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ChromiumUnavailable("chromium is not installed and apt-get as root is not available to "
                                  "install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "chromium"]
    for cmd in (install, ["apt-get", "update", "-qq"], install):
        try:
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                                    check=False)
        except subprocess.TimeoutExpired:
            raise ChromiumUnavailable(f"{' '.join(cmd)} did not finish in {timeout:.0f} s") from None
        if _find_chromium():
            return _find_chromium()
    raise ChromiumUnavailable(f"apt-get install chromium failed: {result.stderr.strip().splitlines()[-1:]}")


@pytest.fixture(scope="session")
def chromium() -> str:
    try:
        return ensure_chromium()
    except ChromiumUnavailable as exc:
        pytest.skip(str(exc))


def test_without_chromium_or_root_the_reason_is_given(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000, raising=False)
    with pytest.raises(ChromiumUnavailable, match="not installed and apt-get as root is not available"):
        ensure_chromium()


def _chromium(chromium: str, page: Path, hash_: str, tmp_path: Path, *extra: str) -> tuple[str, list[str]]:
    """Render `page#hash_` headless -> (serialised DOM, console messages that came from the page)."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", *extra,
           page.as_uri() + hash_]
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # downloads land in $HOME/Downloads, kept in tmp
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [m for m, src in re.findall(r'CONSOLE[^\]]*\] "(.*)", source: (\S+)', proc.stderr)
               if src.startswith(page.as_uri())]
    return proc.stdout, console


def _render(chromium: str, page: Path, hash_: str, tmp_path: Path) -> tuple[list[dict], str, list[str]]:
    """-> (table rows as {column: raw value or text}, DOM, console), asserting the page logged no error."""
    dom, console = _chromium(chromium, page, hash_, tmp_path, "--dump-dom")
    rows = []
    for tr in re.findall(r'<tr class="row">(.*?)</tr>', dom, re.DOTALL):
        cells = re.findall(r'<td(?: class="num")? data-col="([^"]+)"(?: data-v="([^"]*)")?>(.*?)</td>', tr)
        rows.append({col: float(v) if v else text for col, v, text in cells})
    assert len(console) == 1 and console[0] == f"leaderboard: {len(rows)} rows", console
    return rows, dom, console


def _configs(runs: pd.DataFrame) -> pd.DataFrame:
    """Seed means per configuration, the oracle the page's own aggregation is checked against."""
    keys = [c for c, r in column_roles(runs).items() if r == "key"]
    metrics = [c for c, r in column_roles(runs).items() if r == "metric"]
    grouped = runs[runs["status"] == "success"].groupby(keys, dropna=False, sort=False)
    return grouped[metrics].mean().assign(n=grouped.size()).reset_index()


def _front_size(df: pd.DataFrame, x: str, y: str, x_sign: int, y_sign: int) -> int:
    xs, ys = x_sign * df[x].to_numpy(float), y_sign * df[y].to_numpy(float)
    return sum(not np.any((xs <= a) & (ys <= b) & ((xs < a) | (ys < b))) for a, b in zip(xs, ys, strict=True))


def _options(dom: str, select_id: str) -> list[str]:
    body = re.search(rf'<select id="{select_id}"[^>]*>(.*?)</select>', dom, re.DOTALL).group(1)
    return re.findall(r'<option value="([^"]*)"', body)


@pytest.mark.browser
@pytest.mark.slow
def test_page_renders_every_configuration(chromium, page, runs, tmp_path):
    rows, dom, _ = _render(chromium, page, "", tmp_path)
    configs = _configs(runs)
    assert len(rows) == len(configs)
    assert [r["n"] for r in rows] == list(configs["n"]) and min(configs["n"]) == 2  # the failed run left out
    assert np.allclose([r[ACC] for r in rows], configs[ACC], rtol=1e-12)
    filters = [c for c in FILTER_COLUMNS if c in runs.columns]
    assert {"task", "dataset", "regime", "device"} <= set(filters)
    for col in filters:
        assert _options(dom, f"f-{col}") == ["all", *sorted(runs[col].dropna().astype(str).unique())]
    metrics = [c for c, r in column_roles(runs).items() if r == "metric"]
    assert _options(dom, "x") == _options(dom, "y") == metrics
    assert len(re.findall(r'<circle class="pt', dom)) == len(rows)
    front = _front_size(configs, PARAMS, ACC, 1, -1)
    assert len(re.findall(r'<circle class="pt front"', dom)) == front
    polyline = re.search(r'<polyline class="pareto" points="([^"]*)"', dom).group(1)
    assert len(polyline.split()) == front
    assert '<img src="fig_a.png" alt="Figure A caption">' in dom and '<img src="sub/fig_b.png"' in dom
    shot = tmp_path / "leaderboard.png"
    _chromium(chromium, page, "", tmp_path, f"--screenshot={shot}", "--window-size=1400,1000")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@pytest.mark.browser
def test_hash_filters_sorts_and_picks_axes(chromium, page, runs, tmp_path):
    rows, dom, _ = _render(chromium, page, f"#filter=LoRA&task=vision&sort=-{ACC}&x=step_time_s"
                                           f"&y={ACC}", tmp_path)
    configs = _configs(runs)
    keys = [c for c, r in column_roles(runs).items() if r == "key"]
    text = configs[keys].astype(str).apply(lambda col: col.str.lower().str.contains("lora")).any(axis=1)
    expected = configs[text & (configs["task"] == "vision")]
    assert 0 < len(rows) == len(expected) < len(configs)
    shown = [r[ACC] for r in rows]
    assert shown == sorted(shown, reverse=True)
    assert np.allclose(shown, sorted(expected[ACC], reverse=True), rtol=1e-12)
    assert "step_time_s (lower is better" in dom and f"{ACC} (higher is better" in dom
    front = _front_size(expected, "step_time_s", ACC, 1, -1)
    assert len(re.findall(r'<circle class="pt front"', dom)) == front


#: Appended to a copy of the page: records what the page hands to `Blob` (the CSV text) and the file name of
#: the link it clicks in the DOM, stops the real download (headless Chromium writes it to ~/Downloads, and a
#: download in flight can keep the browser from exiting), then clicks the page's own button as a user would.
CLICK_CSV = """<script>
const PageBlob = Blob;
window.Blob = function (parts, options) {
  document.body.append(Object.assign(document.createElement("pre"),
                                     {id: "csv-out", textContent: parts.join("")}));
  return new PageBlob(parts, options);
};
document.addEventListener("click", e => {
  if (e.target.download) { document.body.dataset.download = e.target.download; e.preventDefault(); }
}, true);
document.getElementById("csv").click();
</script></body>"""


@pytest.mark.browser
def test_download_csv_exports_the_filtered_rows(chromium, page, runs, tmp_path):
    probe = page.with_name("probe_csv.html")
    probe.write_text(page.read_text().replace("</body>", CLICK_CSV))
    _, dom, _ = _render(chromium, probe, f"#filter=method:randlora&sort=-{ACC}", tmp_path)
    text = html.unescape(re.search(r'<pre id="csv-out">(.*?)</pre>', dom, re.DOTALL).group(1))
    csv = pd.read_csv(io.StringIO(text))
    assert 'data-download="leaderboard-configs.csv"' in dom
    ok = runs[(runs["status"] == "success") & (runs["method"] == "randlora")]
    keys = [c for c, r in column_roles(runs).items() if r == "key"]
    stats = (ok.groupby(keys, dropna=False)[ACC].agg(["mean", "std", "size"])
             .sort_values("mean", ascending=False))
    assert list(csv["method"].unique()) == ["randlora"] and len(csv) == len(stats)
    assert np.allclose(csv[ACC], stats["mean"], rtol=1e-12) and np.allclose(csv[f"{ACC}_std"], stats["std"])
    assert list(csv["n"]) == list(stats["size"]) and {"seed", "run_id"}.isdisjoint(csv.columns)


@pytest.mark.browser
@pytest.mark.slow
def test_single_runs_view_and_stable_sort(chromium, page, runs, tmp_path):
    rows, _, _ = _render(chromium, page, "#view=runs&sort=seed", tmp_path)
    assert len(rows) == len(runs) and "n" not in rows[0]
    assert [r["seed"] for r in rows] == sorted(runs["seed"].astype(float))
    by_task, _, _ = _render(chromium, page, "#sort=task", tmp_path)
    configs = _configs(runs)  # in order of first appearance, as the page groups them before sorting
    key = list(zip(configs["method"], configs["task"], configs["budget"].astype(float).fillna(-1),
                   strict=True))
    shown = [(r["method"], r["task"], r["budget"] if r["budget"] != "" else -1) for r in by_task]
    assert shown == sorted(key, key=lambda k: k[1])  # stable: ties keep their order


@pytest.mark.browser
def test_hostile_values_render_as_text(chromium, tmp_path):
    evil = "</script><b>x</b>"
    runs = pd.DataFrame({"method": [evil, "m2"], "task": ["t", "t"], "rank_thing": [1.0, 2.0],
                         "other": [3.0, 4.0]})
    rows, dom, _ = _render(chromium, write_leaderboard(runs, tmp_path / "page", []), "", tmp_path)
    assert [r["method"] for r in rows] == ["&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;", "m2"]
    assert "no Pareto front: no better direction for rank_thing, other" in dom
