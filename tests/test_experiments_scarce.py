"""The scarce-data experiments: subsets, paired statistics, and the sweep's pipeline in --quick mode."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from experiments import lazy, lowdata, noise, run_scarce, scarce
from experiments.data import per_class_subset
from experiments.stats import holm, paired

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _labelled(counts: dict[int, int]) -> TensorDataset:
    labels = torch.tensor([c for c, n in counts.items() for _ in range(n)])
    return TensorDataset(torch.arange(len(labels)).float(), labels)


def test_per_class_subset_is_stratified_seeded_and_nested() -> None:
    data = _labelled({0: 12, 1: 9, 2: 15})
    sub = per_class_subset(data, 5, seed=3)
    labels = [int(data[i][1]) for i in sub.indices]
    assert sorted(labels) == [0] * 5 + [1] * 5 + [2] * 5
    assert sub.indices == per_class_subset(data, 5, seed=3).indices
    assert sub.indices != per_class_subset(data, 5, seed=4).indices
    assert set(per_class_subset(data, 3, seed=3).indices) <= set(sub.indices)  # nested sizes for one seed
    assert len(set(sub.indices)) == 15


def test_per_class_subset_errors_name_the_argument_and_the_limit() -> None:
    data = _labelled({0: 4, 1: 9})
    with pytest.raises(ValueError, match=r"`per_class` must be at most 4 \(the images of class 0\), got 5"):
        per_class_subset(data, 5, seed=0)
    with pytest.raises(ValueError, match="`per_class` must be >= 1, got 0"):
        per_class_subset(data, 0, seed=0)


def test_paired_matches_scipy_and_the_exact_wilcoxon_distribution() -> None:
    from scipy import stats

    r = paired([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert r.mean == -1.0 and r.std == 0.0 and r.n == 6
    assert r.wilcoxon_p == pytest.approx(2 / 64)  # all six signs negative: exact two-sided 2 · 2⁻⁶
    assert math.isnan(r.t_p)  # constant differences
    a, b = [3.1, 2.0, 5.2, 4.4, 1.0, 2.5, 3.3], [2.0, 2.2, 4.1, 4.0, 1.5, 1.0, 3.0]
    r = paired(a, b)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    assert r.wilcoxon_p == pytest.approx(stats.wilcoxon(diffs).pvalue)
    assert r.t_p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert paired([1.0, 2.0], [1.0, 2.0]).wilcoxon_p == 1.0
    assert math.isnan(paired([1.0], [2.0]).wilcoxon_p)
    with pytest.raises(ValueError, match="must pair up, got 2 and 3"):
        paired([1.0, 2.0], [1.0, 2.0, 3.0])


def test_holm_matches_the_step_down_definition() -> None:
    ps = [0.01, 0.04, 0.03, 0.005, float("nan"), 0.5]
    got = holm(ps)
    finite = sorted((p, i) for i, p in enumerate(ps) if p == p)
    m, want, running = len(finite), {}, 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        want[i] = running
    assert math.isnan(got[4])
    assert [got[i] for i in sorted(want)] == pytest.approx([want[i] for i in sorted(want)])
    assert [got[i] for i in (3, 0, 2, 1, 5)] == pytest.approx([0.025, 0.04, 0.09, 0.09, 0.5])  # by hand
    assert all(g >= p for g, p in zip(got, ps, strict=True) if p == p)


def test_choose_multiplier_prefers_lowest_error_then_closest_to_one() -> None:
    assert lowdata.choose_multiplier({0.25: [5.0, 5.0], 1.0: [6.0], 4.0: [4.0, 4.5]}) == 4.0
    assert lowdata.choose_multiplier({0.25: [5.0], 1.0: [5.0], 4.0: [5.0]}) == 1.0
    assert lowdata.choose_multiplier({0.25: [5.0], 4.0: [5.0]}) == 0.25  # equal log-distance: the smaller
    assert lowdata.nearest(100, [10, 30]) == 30 and lowdata.nearest(15, [10, 30]) == 10


def test_rows_of_one_seed_share_subset_initialization_and_order() -> None:
    args = lowdata.experiment_parser("lowdata", "x").parse_args(["--quick"])
    setup = scarce.setup_from(args, "experiments.lowdata", [])
    a = scarce.spec(setup, scarce.ROWS["baseline"], 10, 7, 3)
    b = scarce.spec(setup, scarce.ROWS["mhe"], 10, 7, 3, kappa_mult=4.0)
    assert (a.seed, a.data, a.train) == (b.seed, b.data, b.train) and a.data.per_class == 10
    assert b.kappa_mult == 4.0 and a.kappa_mult == 1.0  # the baseline has no κ
    # equal runs of two experiments have equal specs (and run once)
    assert scarce.spec(setup, scarce.ROWS["random"], 30, 0, 3, energy_every=1) == scarce.spec(
        setup, scarce.ROWS[lazy.row_name(1)], 30, 0, 3, energy_every=1
    )


def test_noise_kernel_is_the_closed_form_for_s2() -> None:
    kern = noise.kernel_curves(points=11)
    c = torch.tensor(kern["c"], dtype=torch.float64)
    for k in noise.KERNEL_DIMS:
        got = torch.tensor(kern["2"][str(k)], dtype=torch.float64)
        assert torch.allclose(got, (k - 2 + 2 * c**2) / (k - 3), rtol=1e-10)
    assert set(kern["1"]) == {str(k) for k in noise.KERNEL_DIMS}


def test_run_scarce_quick_writes_every_block_and_shares_runs(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("# results\n")
    out = tmp_path / "out"
    argv = ["--quick", "--out", str(out), "--doc", str(doc), "--seeds", "0", "1", "--tune-seeds", "100"]
    argv += ["--sizes", "10", "--rows", "baseline", "mhe", "random_every8"]
    argv += ["--study-size", "10", "--intervals", "1", "4"]
    results = run_scarce.main(argv)
    for stem in ("lowdata_digits", "noise_digits", "lazy_digits"):
        for ext in ("json", "md", "png"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0, f"{stem}.{ext}"
    assert doc.read_text() == "# results\n", "--quick must never touch the docs"

    low = json.loads((out / "lowdata_digits.json").read_text())
    assert low["rows"] == ["baseline", "mhe", "random_every8"] and low["sizes"] == [10]
    assert len(low["tuning_runs"]) == 2 * 3 * 1  # rows × κ grid × tune seeds
    assert set(low["chosen"]["10"].values()) <= set(scarce.DEFAULT_GRID)
    assert [len(low["runs"]["10"][r]) for r in low["rows"]] == [2, 2, 2]
    assert all(r["steps"] == scarce.QUICK_STEPS for r in low["runs"]["10"]["mhe"])
    assert len(low["comparisons"]) == 2 and all(c["holm_p"] >= c["wilcoxon_p"] for c in low["comparisons"])
    assert "Significant after Holm" in (out / "lowdata_digits.md").read_text()

    nz = results["noise"]
    assert list(nz["runs"]) == list(noise.NOISE_ROWS)
    curve = nz["runs"]["random"][0]["energy_mean"]
    assert [s for s, _ in curve] == list(range(scarce.QUICK_STEPS + 1))  # step 0 and after every step
    assert all(v > 0 for _, v in curve) and nz["runs"]["half_mhe"][0]["energy_half_mean"]

    lz = results["lazy"]
    assert lz["intervals"] == [1, 4]
    assert lz["runs"]["random"] == nz["runs"]["random"] and lz["runs"]["baseline"] == nz["runs"]["baseline"]
    max_dev, final_dev = lazy.deviations(lz["runs"], "baseline", "energy_mean")
    assert max_dev == pytest.approx([1.0, 1.0])  # the baseline is the scale
    assert lazy.deviations(lz["runs"], "random", "energy_mean")[0] == [0.0, 0.0]
    text = (out / "run_scarce.md").read_text()
    assert "| `experiments.lazy` | " in text and text.rstrip().endswith("| 2 |")  # only every_n_steps = 4 is new
