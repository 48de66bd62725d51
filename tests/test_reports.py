"""Hardware peaks and the roofline model (reports/hardware.py, reports/roofline.py), from stored data only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gdn2_tune.kernels.cost import Cost
from gdn2_tune.kernels.spec import family_of
from gdn2_tune.profiles.table import DeviceInfo, Profile, Roofs, load_profile
from gdn2_tune.reports.hardware import memory_gbps, theoretical_peaks
from gdn2_tune.reports.roofline import RoofSet, build_report, combine, floors, stage_point

DATA = Path(__file__).parent / "data"
H100 = DeviceInfo("h100-sxm5", "NVIDIA H100 80GB HBM3", "sm90", (9, 0), 132, 1830, 2619, 5120, None)


def fixture_profile() -> Profile:
    profile, warnings = load_profile(DATA / "h100_profile.json")
    assert profile is not None, warnings
    return profile


def test_h100_peaks_match_the_datasheet() -> None:
    peaks = theoretical_peaks(H100)
    # NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense bf16 (at 1830 MHz), 494.7 tf32, 3.35 TB/s HBM3
    assert peaks.bf16_tflops == pytest.approx(989.4, abs=0.1)
    assert peaks.tf32_tflops == pytest.approx(494.7, abs=0.1)
    assert peaks.memory_gbps == pytest.approx(3352.3, abs=0.1)  # 2 × 2619 MHz × 5120 bit / 8
    assert peaks.reason is None
    assert "H100" in peaks.source


def test_a100_peaks_match_the_whitepaper() -> None:
    a100 = DeviceInfo("a100", "NVIDIA A100-SXM4-80GB", "sm80", (8, 0), 108, 1410, 1593, 5120, None)
    peaks = theoretical_peaks(a100)
    assert peaks.bf16_tflops == pytest.approx(312, rel=2e-3)
    assert peaks.tf32_tflops == pytest.approx(156, rel=2e-3)
    assert peaks.fp32_tflops == pytest.approx(19.5, rel=2e-3)
    assert peaks.memory_gbps == pytest.approx(2039, rel=1e-3)


def test_geforce_boards_get_the_half_rate_tensor_cores() -> None:
    rtx = DeviceInfo("rtx-4090", "NVIDIA GeForce RTX 4090", "sm89", (8, 9), 128, 2520, 10501, 384, None)
    l4 = dataclasses.replace(rtx, name="NVIDIA L4")
    assert theoretical_peaks(rtx).bf16_tflops == pytest.approx(165.2, rel=1e-3)
    assert theoretical_peaks(l4).bf16_tflops == pytest.approx(2 * 165.2, rel=1e-3)


def test_unknown_architecture_gives_a_reason_not_a_guess() -> None:
    t4 = DeviceInfo("tesla-t4", "Tesla T4", "sm75", (7, 5), 40, 1590, 5001, 256, None)
    peaks = theoretical_peaks(t4)
    assert peaks.bf16_tflops is None and peaks.tf32_tflops is None and peaks.fp32_tflops is None
    assert peaks.reason == "unknown architecture (no per-SM rates for sm75)"
    assert peaks.memory_gbps == pytest.approx(320.1, abs=0.1)  # the bus still tells the bandwidth


def test_family_normalisation() -> None:
    assert family_of("sm_90a") == "sm90"
    assert family_of(None, (8, 6)) == "sm86"
    assert family_of("", "8.9") == "sm89"
    assert memory_gbps(None, 5120) is None


ROOFS = RoofSet("measured", memory_gbps=1000.0, bf16_tflops=500.0, fp16_tflops=500.0, tf32_tflops=250.0,
                fp32_tflops=50.0)


@pytest.mark.parametrize(
    ("flops", "mix", "bound"),
    [
        pytest.param(1e11, (("bf16", 1e11),), "memory", id="I100-below-ridge-500"),
        pytest.param(1e12, (("bf16", 1e12),), "bf16 tensor core", id="I1000-above-ridge-500"),
        pytest.param(3e11, (("tf32", 3e11),), "tf32 tensor core", id="I300-above-tf32-ridge-250"),
        pytest.param(3e11, (("bf16", 2e11), ("tf32", 1e11)), "memory", id="mixed-below"),
    ],
)
def test_bound_classification(flops: float, mix: tuple[tuple[str, float], ...], bound: str) -> None:
    cost = Cost(flops, 0.0, 1e9, 1e9, mix)  # 1 GB at 1000 GB/s: a 1 ms memory floor
    f = floors(cost, ROOFS)
    assert f.memory_ms == pytest.approx(1.0)
    assert f.bound == bound
    assert f.floor_ms == pytest.approx(max(f.memory_ms, f.compute_ms))


def test_compute_floor_adds_the_precisions() -> None:
    cost = Cost(3e12, 0.0, 1e9, 1e9, (("bf16", 1e12), ("tf32", 2e12)))
    f = floors(cost, ROOFS)
    assert f.compute_ms == pytest.approx(2.0 + 8.0)  # 1e12/500e12 s + 2e12/250e12 s
    assert f.bound == "tf32 tensor core"


def test_point_percent_of_roof_and_achieved_rates() -> None:
    cost = Cost(1e11, 0.0, 1e9, 1e9, (("bf16", 1e11),))
    p = stage_point("intra", 2.0, cost, ROOFS, dataclasses.replace(ROOFS, memory_gbps=2000.0))
    assert p.gbps == pytest.approx(500.0)
    assert p.tflops == pytest.approx(50.0)
    assert p.intensity == pytest.approx(100.0)
    assert p.pct_roof == pytest.approx(50.0)  # 1 ms floor in 2 ms
    assert p.pct_theoretical == pytest.approx(25.0)
    assert stage_point("intra", None, cost, ROOFS, ROOFS).pct_roof is None


def test_measured_roofs_win_and_gaps_fall_back_to_theory() -> None:
    theory = dataclasses.replace(ROOFS, source="theoretical", memory_gbps=3000.0, fp32_tflops=60.0)
    measured = dataclasses.replace(ROOFS, fp32_tflops=None)
    roofs = combine(measured, theory)
    assert roofs.memory_gbps == 1000.0 and roofs.fp32_tflops == 60.0
    assert roofs.source == "measured + theoretical"
    assert combine(None, theory) == theory


def test_report_of_the_recorded_profile() -> None:
    report = build_report(fixture_profile())
    anchor = report.entry("B8-T4096-H16-K128-V128-bf16")
    assert report.entry("fwd/K128-V128-bf16/T4096-BH128") == anchor
    assert report.roofs.source == "measured" and report.roofs.memory_gbps == 3020.0
    total = anchor.point("total")
    assert total is not None and total.time_ms == 1.12
    assert anchor.speedup_baseline == pytest.approx(2.28 / 1.12)
    assert total.bound == "memory"
    assert total.pct_roof == pytest.approx(100 * total.cost.bytes_min / 3020e9 * 1e3 / 1.12)
    # the op floor: BASELINE.md's ~1.07 GB at the measured 3.02 TB/s
    assert anchor.op_floor_ms == pytest.approx(1.0737e9 / 3020e9 * 1e3, rel=1e-3)
    with pytest.raises(ValueError, match="known"):
        report.entry("B9-nope")


def test_report_of_an_unknown_gpu_has_no_percentages() -> None:
    profile = fixture_profile()
    t4 = DeviceInfo("tesla-t4", "Tesla T4", "sm75", (7, 5), 40, 1590, 5001, 256, None)
    report = build_report(dataclasses.replace(profile, device=t4, roofs=None))
    assert report.note is not None and "no per-SM rates for sm75" in report.note
    for e in report.entries:
        for p in (*e.tuned, *e.default):
            assert p.pct_roof is None and p.bound is None
            assert p.gbps is not None  # achieved rates still come from the stored times


def test_measured_roofs_on_an_unknown_gpu_still_classify() -> None:
    profile = fixture_profile()
    t4 = DeviceInfo("tesla-t4", "Tesla T4", "sm75", (7, 5), 40, 1590, 5001, 256, None)
    report = build_report(dataclasses.replace(profile, device=t4, roofs=Roofs(300.0, 60.0, 30.0, 8.0)))
    total = report.entries[0].point("total")
    assert total is not None and total.bound is not None and total.pct_roof is not None
    assert total.pct_theoretical is None


def test_percent_of_roof_for_the_live_view() -> None:
    from gdn2_tune.kernels.config import FwdConfig, Shape
    from gdn2_tune.kernels.cost import stage_costs
    from gdn2_tune.reports.roofline import percent_of_roof

    shape = Shape(8, 4096, 16, 128, 128)
    intra = stage_costs(shape, FwdConfig())["intra"]
    floor_ms = intra.bytes_min / 3000e9 * 1e3  # memory-bound at the measured 3000 GB/s
    pct, bound = percent_of_roof(shape, FwdConfig(), "intra", 2 * floor_ms, H100, Roofs(3000.0, 700.0, 400.0, 60.0))
    assert bound == "memory" and pct == pytest.approx(50.0)
    t4 = DeviceInfo("tesla-t4", "Tesla T4", "sm75", (7, 5), 40, 1590, 5001, 256, None)
    assert percent_of_roof(shape, FwdConfig(), "intra", 1.0, t4) == (None, None)


def test_measure_roofs_needs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from gdn2_tune.tuner.roofs import measure_roofs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="expected a CUDA device"):
        measure_roofs()
