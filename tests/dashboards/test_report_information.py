"""entrotrain report: the information-plane section (InformationPlaneMonitor's keys) and its wandb table.

Synthetic run records written through RunRecordLogger: in the "tanh" run layers L2 and L3 reach their I(X;T) peak at
step 40 and then lose 30 %, L1 keeps rising; in the "relu" run every layer keeps rising. I(T;Y) saturates.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("matplotlib")

from entrotrain.dashboards import report_figures_information as info_figs  # noqa: E402
from entrotrain.dashboards.report import build_report, sections_of, write_report  # noqa: E402
from entrotrain.dashboards.run_reader import RunData, load_run  # noqa: E402
from entrotrain.dashboards.report_template import fmt  # noqa: E402
from entrotrain.dashboards.run_record import RunRecordLogger  # noqa: E402
from tests.helpers.report_page import parse_page  # noqa: E402

STEPS = list(range(0, 101, 10))
LAYERS = ("L1", "L2", "L3")
ESTIMATORS = ("binning", "kde")


def i_xt(step: int, layer: str, compress: bool) -> float:
    """Rises to 2·depth at step 40; then, compressing layers (L2, L3 of the tanh run) fall by 30 %, others rise on."""
    depth = LAYERS.index(layer) + 1
    peak = 2.0 * depth
    if step <= 40:
        return peak * step / 40
    if compress and layer != "L1":
        return peak * (1 - 0.3 * (step - 40) / 60)
    return peak * (1 + 0.5 * (step - 40) / 60)


def i_ty(step: int, layer: str) -> float:
    return 0.99 * (1 - math.exp(-step / 30)) / (LAYERS.index(layer) + 1)


def write_info_run(root: Path, name: str, compress: bool, extra: dict[int, dict[str, float]] | None = None) -> Path:
    logger = RunRecordLogger(root, name="records", version=name, run_name=name)
    logger.log_hyperparams(
        {
            "info/layers": {"L1": "net.0", "L2": "net.2", "L3": "net.4"},
            "info/binning/params": {"n_bins": 30, "range": [-1, 1], "base": 2.0},
            "info/kde/params": {"noise_variance": 1e-3},
        }
    )
    for step in STEPS:
        metrics = {}
        for estimator in ESTIMATORS:
            scale = 1.0 if estimator == "binning" else 0.7
            for layer in LAYERS:
                metrics[f"info/{layer}/{estimator}/I_XT"] = scale * i_xt(step, layer, compress)
                metrics[f"info/{layer}/{estimator}/I_TY"] = scale * i_ty(step, layer)
        metrics["info/nonfinite"] = 0.0
        metrics.update((extra or {}).get(step, {}))
        logger.log_metrics(metrics, step=step)
        logger.log_metrics({"train/loss": 0.7 - step / 400}, step=step)
    logger.finalize("success")
    return logger.run_dir


@pytest.fixture
def tanh_run(tmp_path: Path) -> Path:
    return write_info_run(tmp_path, "tanh", compress=True)


@pytest.fixture
def relu_run(tmp_path: Path) -> Path:
    return write_info_run(tmp_path, "relu", compress=False)


def test_information_section_of_one_run(tanh_run):
    # an info-only run is monitor output (no entropy/* key at all)
    index = build_report([tanh_run])
    page = parse_page(index)
    assert "information_plane.png" in page.images and "section_information.png" in page.images
    assert (index.parent / "information_plane.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = index.read_text()
    assert 'id="information"' in html and ">Information plane<" in html
    text = page.joined
    for estimator in ESTIMATORS:
        assert (f"Information plane ({estimator}): I(X;T) compressed (ended > 5 % below its peak) in L2, L3; "
                "kept rising in L1.") in text
    # the table: peak and its step, last value, verdict; the logged parameters beside it
    assert "6 (step 40)" in text and "4.2" in text  # binning L3: peak 6 at step 40, last 6·0.7
    assert text.count("compression") >= 4 and "info/binning/params" in text and "noise_variance" in text


def test_two_runs_side_by_side(tanh_run, relu_run, tmp_path):
    index = build_report([tanh_run, relu_run], tmp_path / "cmp")
    text = parse_page(index).joined
    assert "Information plane (kde): I(X;T) kept rising in L1, L2, L3." in text
    assert "Compression of I(X;T) (binning): L2, L3 in tanh; no layer in relu." in text
    assert "Information plane (kde): I(X;T) compressed (ended > 5 % below its peak) in L2, L3; kept rising in L1." in text
    figure = info_figs.information_plane([load_run(tanh_run), load_run(relu_run)], tmp_path)
    assert "rows: tanh (top), relu (bottom)" in figure.caption


def test_units_and_trajectories_follow_the_record(tanh_run):
    run = load_run(tanh_run)
    assert info_figs.unit_of([run], "binning") == "bits" and info_figs.unit_of([run], "kde") == "nats"
    run.hparams["info/probe"] = {"rows": 4096, "base": 2}  # the monitor's probe base, when params lack one
    assert info_figs.unit_of([run], "kde") == "bits"
    run.hparams["info/kde/params"]["base"] = 10.0
    assert info_figs.unit_of([run], "kde") == "log base 10"
    traj = info_figs.trajectories(run)
    assert list(traj) == ["binning", "kde"] and [t.layer for t in traj["kde"]] == list(LAYERS)
    l3 = traj["kde"][2]
    assert l3.steps.tolist() == STEPS
    np.testing.assert_allclose(l3.i_xt, [0.7 * i_xt(s, "L3", True) for s in STEPS], rtol=0, atol=1e-12)
    np.testing.assert_allclose(l3.i_ty, [0.7 * i_ty(s, "L3") for s in STEPS], rtol=0, atol=1e-12)


def test_each_run_panel_names_its_own_unit_and_parameters(tanh_run, relu_run, tmp_path, monkeypatch):
    # the relu run logged kde in bits, the tanh run in nats, and its own binning grid (as the ReLU recipe's
    # n_bins=500 on [0, 35)): the first run's base is the unit, and each run's panels show their own unit and
    # parameters, not those of whichever run logged bits or came first
    nats, bits = load_run(tanh_run), load_run(relu_run)
    nats.hparams["info/kde/params"]["base"] = math.e
    bits.hparams["info/kde/params"]["base"] = 2.0
    bits.hparams["info/binning/params"] = {"n_bins": 500, "range": [0.0, 35.0], "base": 2.0}
    assert info_figs.unit_of([nats, bits], "kde") == "nats" and info_figs.unit_of([bits, nats], "kde") == "bits"
    panels = {}

    def keep_labels(fig, out_dir, name):
        for ax in fig.axes:
            if ax.get_title():
                title, _, params = ax.get_title().partition("\n")
                panels[title] = (ax.get_xlabel(), ax.get_ylabel(), params)
        return f"{name}.png"

    monkeypatch.setattr(info_figs, "_save", keep_labels)
    info_figs.information_plane([nats, bits], tmp_path)
    assert panels["tanh · kde"][:2] == ("I(X;T) (nats)", "I(T;Y) (nats)")
    assert panels["relu · kde"][:2] == ("I(X;T) (bits)", "I(T;Y) (bits)")
    assert panels["tanh · binning"][:2] == panels["relu · binning"][:2] == ("I(X;T) (bits)", "I(T;Y) (bits)")
    assert panels["tanh · binning"][2] == "(n_bins=30, range=[-1, 1])"
    assert panels["relu · binning"][2] == "(n_bins=500, range=[0.0, 35.0])"


def test_nonfinite_points_are_skipped(tanh_run, tmp_path):
    run = load_run(tanh_run)
    scalars = {k: (s.copy(), v.copy()) for k, (s, v) in run.scalars.items()}
    scalars["info/L2/binning/I_XT"][1][[2, 7]] = [np.nan, np.inf]
    scalars["info/L1/binning/I_TY"][1][-1] = -np.inf
    scalars["info/L3/kde/I_XT"][1][:] = np.nan  # a layer with no finite point at all
    scalars["info/L1/kde/I_XT"] = (scalars["info/L1/kde/I_XT"][0][:1], scalars["info/L1/kde/I_XT"][1][:1])
    bad = RunData(path=run.path, meta=dict(run.meta), scalars=scalars, hparams=run.hparams)
    traj = {t.layer: t for t in info_figs.trajectories(bad)["binning"]}
    assert traj["L2"].steps.tolist() == [s for i, s in enumerate(STEPS) if i not in (2, 7)]
    assert traj["L1"].steps.tolist() == STEPS[:-1] and np.isfinite(traj["L1"].i_ty).all()
    figure = info_figs.information_plane([bad], tmp_path)
    assert (tmp_path / figure.file).is_file()
    lines = info_figs.information_findings(bad)
    assert "Information plane (binning): I(X;T) compressed (ended > 5 % below its peak) in L2, L3; kept rising in L1." in lines
    assert "Information plane (kde): I(X;T) compressed (ended > 5 % below its peak) in L2; too few finite points in L1, L3." in lines
    rows = info_figs.information_rows([bad])
    assert ["tanh", "kde", "nats", "L3", "–", "–", "–", fmt(0.7 * i_ty(100, "L3")), "too few points"] in rows
    assert not any("nan" in cell or "inf" in cell for row in rows for cell in row)
    assert "information_plane.png" in write_report([bad], tmp_path / "nf").read_text()


def test_nonfinite_through_the_logger_and_missing_keys(tmp_path, attention_run):
    run_dir = write_info_run(tmp_path, "nan", compress=True, extra={50: {"info/L3/kde/I_XT": float("nan")}})
    traj = {t.layer: t for t in info_figs.trajectories(load_run(run_dir))["kde"]}
    assert 50 not in traj["L3"].steps.tolist() and 50 in traj["L2"].steps.tolist()
    assert "information_plane.png" in parse_page(build_report([run_dir])).images
    # a record from before the information-plane monitor: no section, no figure
    html = build_report([attention_run]).read_text()
    assert 'id="information"' not in html and "information_plane.png" not in html  # (the page quotes the run's
    # command line, which may name a test file such as test_information_plane_monitor.py)
    # I_XT without I_TY: a table row and a finding, no trajectory to draw
    logger = RunRecordLogger(tmp_path, name="records", version="xt", run_name="xt")
    for step, value in ((0, 1.0), (10, 3.0), (20, 2.0)):
        logger.log_metrics({"info/L1/ksg/I_XT": value}, step=step)
    logger.finalize("success")
    page = parse_page(build_report([logger.run_dir]))
    assert "information_plane.png" not in page.images
    assert "Information plane (ksg): I(X;T) compressed (ended > 5 % below its peak) in L1." in page.joined


def test_information_section_is_known():
    sections = sections_of(["info/L1/kde/I_XT", "info/nonfinite", "entropy/attn/min", "train/loss", "infox/a"])
    assert [s.id for s in sections] == ["attention", "information", "task", "infox"]


@pytest.mark.parametrize(
    "values, verdict",
    [
        ([0.0, 1.0, 2.0, 3.0], "rising"),
        ([0.0, 2.0, 1.8, 1.85], "compression"),  # 1.85 < 2 − 0.1
        ([0.0, 2.0, 1.95, 1.92], "rising"),  # fell by 4 % of the peak (within the margin): rose overall
        ([1.0, 1.02, 1.01, 1.0], "flat"),
        ([3.0, 2.0, 1.0, 0.5], "compression"),
        ([np.nan, 1.0], "too few points"),
    ],
)
def test_xt_phase_cases(values, verdict):
    assert info_figs.xt_phase(np.arange(len(values)), np.array(values)).verdict == verdict


finite = st.floats(-1e3, 1e3, allow_nan=False)


@given(st.lists(finite, min_size=2, max_size=20), st.lists(st.integers(0, 25), max_size=5))
def test_xt_phase_properties(values, holes):
    values = np.array(values)
    steps = np.arange(len(values)) * 10
    phase = info_figs.xt_phase(steps, values)
    # the verdict follows its definition, read off the values directly
    peak, first, last = values.max(), values[0], values[-1]
    tol = info_figs.COMPRESSION_MARGIN * abs(peak)
    assert phase.peak == peak and phase.peak_step == steps[int(np.argmax(values))] and phase.last == last
    assert (phase.verdict == "compression") == (peak - last > tol)
    assert (phase.verdict == "rising") == (peak - last <= tol and last - first > tol)
    # a non-decreasing curve never compresses
    assert info_figs.xt_phase(steps, np.sort(values)).verdict != "compression"
    # NaN / inf points inserted anywhere but at the ends change nothing
    noisy_steps, noisy = list(steps), list(values)
    for h in holes:
        at = 1 + h % max(1, len(noisy) - 1)
        noisy.insert(at, [np.nan, np.inf, -np.inf][h % 3])
        noisy_steps.insert(at, -1)
    assert info_figs.xt_phase(np.array(noisy_steps), np.array(noisy)) == phase


def test_step_colours_stretch_only_for_thinning_schedules():
    uniform, stretched = info_figs.step_norm(np.arange(0, 1000, 50))
    assert not stretched and uniform(500) == pytest.approx(500 / 950)
    epochs = np.unique(np.logspace(0, np.log2(1500), 40, base=2).astype(int)) - 1  # IDNNs' schedule
    norm, stretched = info_figs.step_norm(epochs * 13)
    assert stretched and norm(epochs[10] * 13) > 2 * epochs[10] * 13 / (epochs[-1] * 13)  # early steps get more colour
    assert norm(0) == 0 and norm(epochs[-1] * 13) == pytest.approx(1)
