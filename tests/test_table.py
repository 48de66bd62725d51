"""The table format (profiles/table.py): round trips, atomic writes, validation of hostile files, merging."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import triton

from gdn2_tune.kernels.config import FwdConfig, Shape, default_config
from gdn2_tune.kernels.decode_spec import DECODE_OP
from gdn2_tune.kernels.spec import family_from_capability, get_spec
from gdn2_tune.profiles import table
from gdn2_tune.profiles.table import (
    SCHEMA_VERSION,
    DeviceInfo,
    Entry,
    Profile,
    Roofs,
    Timing,
    TrialRecord,
    device_id_from_name,
    entry_key,
    kernel_source_hash,
    load_profile,
    merge_profiles,
    profile_path,
    save_profile,
)

DENSE = Shape(B=8, T=4096, H=16, K=128, V=128, dtype="bf16")
VARLEN = Shape(B=1, T=32768, H=16, K=128, V=128, dtype="bf16", num_seqs=8)
SMALL = Shape(B=2, T=100, H=3, K=64, V=32, dtype="fp16")


def make_config(**flat: Any) -> FwdConfig:
    return FwdConfig.from_flat({**default_config(DENSE).flat(), **flat})


def make_entry(shape: Shape, config: FwdConfig | None = None, p50: float = 1.0) -> Entry:
    return Entry(
        key=entry_key("fwd", shape),
        stage="fwd",
        shape=shape,
        config=config or default_config(shape),
        timing=Timing(p20_ms=0.9 * p50, p50_ms=p50, p80_ms=1.1 * p50, spread=0.02),
        default_timing=Timing(p20_ms=1.8 * p50, p50_ms=2 * p50, p80_ms=2.2 * p50, spread=0.03),
        speedup=2.0,
        stage_ms={"intra": 0.4 * p50, "state": 0.6 * p50},
        default_stage_ms={"intra": 0.8 * p50, "state": 1.2 * p50},
        baseline_ms=3 * p50,
        trials=50,
        failed=2,
        pruned=5,
    )


def make_profile(entries: tuple[Entry, ...], device_id: str = "h100-80gb-hbm3", **header: Any) -> Profile:
    device = DeviceInfo(
        device_id=device_id,
        name="NVIDIA H100 80GB HBM3",
        family="sm90",
        compute_capability=(9, 0),
        sm_count=132,
        sm_clock_mhz=1980,
        mem_clock_mhz=2619,
        bus_width_bits=5120,
        driver="550.54.15",
    )
    trials = (
        TrialRecord(entries[0].key, 0, "COMPLETE", 1.25, make_config().flat(), None),
        TrialRecord(entries[0].key, 1, "PRUNED", None, make_config(chunk=128).flat(), "wrong answer"),
    )
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "device": device,
        "torch_version": "2.13.0",
        "triton_version": triton.__version__,
        "kernel_hash": kernel_source_hash(),
        "created": "2026-11-26T20:00:00+00:00",
        "sampler": "tpe",
        "budget": {"trials": 200, "timeout_s": 3600},
        "interpret": False,
        "roofs": Roofs(copy_gbps=3000.0, bf16_tflops=700.0, tf32_tflops=350.0, fp32_tflops=60.0),
        "entries": entries,
        "trials": trials,
    }
    return Profile(**{**fields, **header})


PROFILE = make_profile(
    (make_entry(DENSE), make_entry(VARLEN, make_config(chunk=32), p50=2.0), make_entry(SMALL, p50=0.05))
)


# ---------------------------------------------------------------------------------------------------------------
# Keys and ids


@pytest.mark.parametrize(
    ("shape", "key"),
    [
        pytest.param(DENSE, "fwd/K128-V128-bf16/T4096-BH128", id="dense-bucket-is-T-and-B*H"),
        pytest.param(VARLEN, "fwd/K128-V128-bf16/T32768-BH16-varlen", id="varlen-bucket-is-total-tokens-and-H"),
        pytest.param(SMALL, "fwd/K64-V32-fp16/T100-BH6", id="awkward-T-and-fp16"),
    ],
)
def test_entry_key_is_readable(shape: Shape, key: str) -> None:
    assert entry_key("fwd", shape) == key


@pytest.mark.parametrize(
    ("name", "device_id"),
    [
        pytest.param("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3", id="vendor-word-dropped"),
        pytest.param("H100 80GB HBM3", "h100-80gb-hbm3", id="stable-without-vendor-word"),
        pytest.param("  nvidia   H100__80GB--HBM3 ", "h100-80gb-hbm3", id="separators-collapse"),
        pytest.param("NVIDIA GeForce RTX 4090", "geforce-rtx-4090", id="consumer-card"),
        pytest.param("../../etc", "etc", id="path-traversal-is-harmless"),
        pytest.param("a/b\\c d\x00e", "a-b-c-d-e", id="slashes-and-nul"),
        pytest.param("", "unknown", id="empty-name"),
        pytest.param("../..//", "unknown", id="nothing-usable"),
    ],
)
def test_device_id_from_name_is_a_safe_stable_stem(name: str, device_id: str) -> None:
    assert device_id_from_name(name) == device_id
    assert table.is_safe_id(device_id)


def test_device_id_from_a_very_long_name_is_bounded() -> None:
    device_id = device_id_from_name("NVIDIA " + "x1 " * 200)
    assert table.is_safe_id(device_id)
    assert len(device_id) <= table.MAX_DEVICE_ID_CHARS


@pytest.mark.parametrize(
    ("capability", "family"),
    [
        pytest.param((9, 0), "sm90", id="hopper"),
        pytest.param((8, 6), "sm86", id="ampere-consumer"),
        pytest.param((12, 0), "sm120", id="two-digit-major"),
    ],
)
def test_family_from_capability(capability: tuple[int, int], family: str) -> None:
    assert family_from_capability(capability) == family


def test_family_from_capability_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="compute capability"):
        family_from_capability((-1, 0))


@pytest.mark.parametrize("device_id", ["../etc", "H100", "a/b", "", "x" * 65])
def test_profile_path_refuses_unsafe_ids(device_id: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device_id"):
        profile_path(device_id, tmp_path)


def test_profile_path_is_the_device_file_in_root(tmp_path: Path) -> None:
    assert profile_path("h100-80gb-hbm3", tmp_path) == tmp_path / "h100-80gb-hbm3.json"


# ---------------------------------------------------------------------------------------------------------------
# Round trip and atomic save


def test_profile_round_trips_through_dict_and_file(tmp_path: Path) -> None:
    assert Profile.from_dict(json.loads(json.dumps(PROFILE.to_dict()))) == PROFILE
    path = tmp_path / "h100-80gb-hbm3.json"
    save_profile(PROFILE, path)
    loaded, warnings = load_profile(path)
    assert warnings == []
    assert loaded == PROFILE


def test_saved_table_is_sorted_indented_json(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    save_profile(PROFILE, path)
    text = path.read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_profile_without_roofs_or_trials_round_trips(tmp_path: Path) -> None:
    bare = dataclasses.replace(PROFILE, roofs=None, trials=())
    save_profile(bare, tmp_path / "t.json")
    assert load_profile(tmp_path / "t.json") == (bare, [])


@pytest.mark.parametrize("failing", ["os.replace", "os.fsync"])
def test_failed_save_leaves_the_old_table_and_no_temporary(failing: str, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.json"
    path.write_text("old contents")

    def boom(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, failing.split(".")[1], boom)
    with pytest.raises(OSError, match="disk full"):
        save_profile(PROFILE, path)
    assert path.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_save_refuses_a_profile_the_loader_would_reject(tmp_path: Path) -> None:
    bad = make_entry(DENSE)
    bad = dataclasses.replace(bad, timing=Timing(p20_ms=1.0, p50_ms=-1.0, p80_ms=2.0, spread=0.0))
    path = tmp_path / "t.json"
    with pytest.raises(ValueError, match=r"entries\[0\]\.timing\.p50_ms"):
        save_profile(make_profile((bad,)), path)
    assert not path.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Validation of corrupt and hand-mangled tables


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting a dotted path (``entries.0.config.intra.BK``) of a table's dict."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return mutate


def _shrink_k(data: dict[str, Any]) -> None:
    # A consistent key and shape, but the tuned config's BK=64 cannot run at K=32.
    entry = data["entries"][0]
    entry["config"]["intra"]["BK"] = 64
    entry["shape"]["K"] = 32
    entry["key"] = entry_key("fwd", Shape(**entry["shape"]))


def _duplicate_first_entry(data: dict[str, Any]) -> None:
    data["entries"].insert(1, copy.deepcopy(data["entries"][0]))


ENTRY_PROBLEMS = [
    pytest.param(_set("entries.0.config.intra.BK", 4096), "entries[0].config.intra.BK", id="absurd-tile-BK4096"),
    pytest.param(_set("entries.0.config.chunk", 7), "entries[0].config.chunk", id="absurd-chunk-7"),
    pytest.param(_set("entries.0.config.chunk", 64.0), "entries[0].config.chunk", id="float-for-an-int-tile"),
    pytest.param(_set("entries.0.config.state.num_warps", True), "entries[0].config.state.num_warps", id="bool-warps"),
    pytest.param(_set("entries.0.config.intra.extra", 1), "entries[0].config", id="unknown-config-key"),
    pytest.param(_shrink_k, "entries[0].config", id="config-infeasible-at-its-shape"),
    pytest.param(_set("entries.0.timing.p50_ms", -1.0), "entries[0].timing.p50_ms", id="negative-timing"),
    pytest.param(_set("entries.0.timing.p20_ms", 5.0), "entries[0].timing", id="quantiles-out-of-order"),
    pytest.param(_set("entries.0.speedup", "fast"), "entries[0].speedup", id="string-speedup"),
    pytest.param(_set("entries.0.trials", -3), "entries[0].trials", id="negative-trial-count"),
    pytest.param(_set("entries.0.stage_ms.intra", None), "entries[0].stage_ms.intra", id="null-stage-time"),
    pytest.param(_set("entries.0.shape.dtype", "fp8"), "entries[0].shape.dtype", id="unknown-dtype"),
    pytest.param(_set("entries.0.shape.T", "4096"), "entries[0].shape.T", id="string-T"),
    pytest.param(_set("entries.0.key", "fwd/K128-V128-bf16/T1-BH1"), "entries[0].key", id="key-not-its-shape"),
    pytest.param(_set("entries.0.stage", "../fwd"), "entries[0].stage", id="stage-with-slash"),
    pytest.param(_delete("entries.0.timing"), "entries[0].timing", id="missing-timing"),
    pytest.param(_set("entries.0", [1, 2]), "entries[0]", id="entry-is-a-list"),
    pytest.param(_duplicate_first_entry, "entries[1].key", id="duplicate-key"),
    pytest.param(_set("trials.0.value_ms", float("nan")), "trials[0].value_ms", id="nan-trial-time"),
    pytest.param(_set("trials.0.params", {"chunk": [64]}), "trials[0].params.chunk", id="nested-trial-param"),
]


def _load_mutated(mutate: Callable[[dict[str, Any]], None], tmp_path: Path) -> tuple[Path, Any]:
    data = PROFILE.to_dict()
    mutate(data)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    return path, load_profile(path)


@pytest.mark.parametrize(("mutate", "field"), ENTRY_PROBLEMS)
def test_bad_entry_is_skipped_with_one_warning_naming_file_and_field(
    mutate: Callable[[dict[str, Any]], None], field: str, tmp_path: Path
) -> None:
    path, (loaded, warnings) = _load_mutated(mutate, tmp_path)
    assert loaded is not None
    assert len(warnings) == 1
    assert str(path) in warnings[0] and f"{field}:" in warnings[0]
    # Exactly the bad item went; the rest of the table is intact.
    kept = len(loaded.entries) + len(loaded.trials)
    assert kept == len(PROFILE.entries) + len(PROFILE.trials) - 1 + (field == "entries[1].key")
    assert {e.key for e in loaded.entries} <= {e.key for e in PROFILE.entries}


HEADER_PROBLEMS = [
    pytest.param(_set("kernel_hash", "0123456789abcdef"), "kernel_hash", id="schema-2-hash-a-string"),
    pytest.param(_set("kernel_hash", {"Fwd!": "0123456789abcdef"}), "kernel_hash.Fwd!", id="hash-of-a-bad-op-name"),
    pytest.param(_set("kernel_hash", {"fwd": 5}), "kernel_hash.fwd", id="hash-not-a-string"),
    pytest.param(_set("kernel_hash", {"fwd": ""}), "kernel_hash.fwd", id="empty-hash"),
    pytest.param(_set("schema_version", 3), "schema_version", id="unknown-schema-version"),
    pytest.param(_set("schema_version", "1"), "schema_version", id="string-schema-version"),
    pytest.param(_set("schema_version", True), "schema_version", id="bool-schema-version"),
    pytest.param(_set("schema_version", 1.0), "schema_version", id="float-schema-version"),
    pytest.param(_delete("schema_version"), "schema_version", id="missing-schema-version"),
    pytest.param(_set("device.device_id", "../../etc/passwd"), "device.device_id", id="device-id-with-dotdot"),
    pytest.param(_set("device.device_id", "H100 80GB"), "device.device_id", id="device-id-not-normalised"),
    pytest.param(_set("device.name", 123), "device.name", id="device-name-not-a-string"),
    pytest.param(_set("device.compute_capability", [9]), "device.compute_capability", id="short-capability"),
    pytest.param(_set("device.sm_count", 0), "device.sm_count", id="zero-SMs"),
    pytest.param(_set("triton_version", None), "triton_version", id="null-triton-version"),
    pytest.param(_set("interpret", "yes"), "interpret", id="string-for-bool"),
    pytest.param(_set("entries", {}), "entries", id="entries-not-a-list"),
    pytest.param(_set("roofs", {"copy_gbps": -5}), "roofs.copy_gbps", id="negative-roof"),
    pytest.param(_set("budget", {"trials": {"n": 1}}), "budget.trials", id="nested-budget"),
]


@pytest.mark.parametrize(("mutate", "field"), HEADER_PROBLEMS)
def test_bad_header_makes_the_table_unusable_with_a_warning(
    mutate: Callable[[dict[str, Any]], None], field: str, tmp_path: Path
) -> None:
    path, (loaded, warnings) = _load_mutated(mutate, tmp_path)
    assert loaded is None
    assert len(warnings) == 1
    assert str(path) in warnings[0] and f"{field}:" in warnings[0]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        pytest.param(b"{not json", "invalid JSON", id="bad-json"),
        pytest.param(b"", "invalid JSON", id="empty-file"),
        pytest.param(b"[1, 2]", "top level", id="list-at-top-level"),
        pytest.param(b"\xff\xfe\x00garbage", "not UTF-8", id="binary-garbage"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="deeply-nested-json"),
    ],
)
def test_unreadable_file_gives_no_profile_and_a_warning(content: bytes, words: str, tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_bytes(content)
    loaded, warnings = load_profile(path)
    assert loaded is None
    assert len(warnings) == 1 and str(path) in warnings[0] and words in warnings[0]


def test_missing_file_gives_no_profile_and_a_warning(tmp_path: Path) -> None:
    loaded, warnings = load_profile(tmp_path / "absent.json")
    assert loaded is None
    assert len(warnings) == 1 and "absent.json" in warnings[0]


def test_oversized_file_is_not_parsed(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.json"
    save_profile(PROFILE, path)
    monkeypatch.setattr(table, "MAX_TABLE_BYTES", 100)
    loaded, warnings = load_profile(path)
    assert loaded is None and "bytes" in warnings[0]


def test_strict_from_dict_raises_on_a_bad_entry() -> None:
    data = PROFILE.to_dict()
    data["entries"][0]["config"]["chunk"] = 7
    with pytest.raises(table.TableFieldError) as err:
        Profile.from_dict(data)
    assert err.value.field == "entries[0].config.chunk"


# ---------------------------------------------------------------------------------------------------------------
# Merging


def test_merge_keeps_the_faster_entry_per_key_and_says_which() -> None:
    other_dense = make_config(**{"state.num_warps": 8})
    first = make_profile((make_entry(DENSE, p50=1.0), make_entry(SMALL, p50=0.05)), sampler="tpe")
    second = make_profile(
        (make_entry(DENSE, other_dense, p50=0.8), make_entry(SMALL, p50=0.07), make_entry(VARLEN, p50=2.0)),
        sampler="random",
        created="2026-11-27T08:00:00+00:00",
    )
    merged, notes = merge_profiles([first, second], names=["run-a.json", "run-b.json"])
    by_key = {e.key: e for e in merged.entries}
    assert by_key[entry_key("fwd", DENSE)].config == other_dense
    assert by_key[entry_key("fwd", SMALL)].timing.p50_ms == 0.05
    assert entry_key("fwd", VARLEN) in by_key
    assert len(notes) == 2
    dense_note = next(n for n in notes if n.startswith(entry_key("fwd", DENSE)))
    assert "kept run-b.json" in dense_note and "over run-a.json" in dense_note
    small_note = next(n for n in notes if n.startswith(entry_key("fwd", SMALL)))
    assert "kept run-a.json" in small_note
    assert merged.sampler == "random+tpe"
    assert merged.created == "2026-11-27T08:00:00+00:00"
    assert len(merged.trials) == len(first.trials) + len(second.trials)


def test_merge_keeps_the_earlier_table_on_a_tie() -> None:
    a = make_profile((make_entry(DENSE, p50=1.0),))
    b = make_profile((make_entry(DENSE, make_config(**{"state.num_warps": 8}), p50=1.0),))
    merged, notes = merge_profiles([a, b])
    assert merged.entries[0].config == a.entries[0].config
    assert "kept #1" in notes[0] and "same median" in notes[0]


@pytest.mark.parametrize("kept", [pytest.param(True, id="kept-the-incumbent"), pytest.param(False, id="beat-it")])
def test_merge_keeps_a_run_that_re_timed_the_earlier_entry_as_its_incumbent(kept: bool) -> None:
    # The earlier table's median (1.0) is lower than the later run's (1.03), but the later run timed that very
    # config next to its own (1.05 there) and chose: a same-run comparison, not one across runs.
    earlier = make_entry(DENSE, p50=1.0)
    other = make_config(**{"state.num_warps": 8})
    inc = table.Incumbent(earlier.config, Timing(0.95, 1.05, 1.15, 0.01), table.ServedFrom.OWN, "h200.json",
                          earlier.key)
    later = dataclasses.replace(make_entry(DENSE, earlier.config if kept else other, p50=1.03), incumbent=inc)
    merged, notes = merge_profiles([make_profile((earlier,)), make_profile((later,))], names=["old.json", "run"])
    assert merged.entries[0] == later
    assert "kept run" in notes[0] and "re-timed old.json's config" in notes[0]
    assert ("kept it" if kept else f"chose {other.label()} over it") in notes[0]
    # A run whose incumbent was another config (another key's bucket) is compared by median as before.
    stranger = dataclasses.replace(later, incumbent=dataclasses.replace(inc, key="fwd/elsewhere"))
    merged, notes = merge_profiles([make_profile((earlier,)), make_profile((stranger,))], names=["old.json", "run"])
    assert merged.entries[0] == earlier and "faster median" in notes[0]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"device_id": "h200"}, "device.device_id", id="other-device"),
        pytest.param({"triton_version": "0.0.1"}, "triton_version", id="other-triton"),
        pytest.param({"interpret": True}, "interpret", id="interpreter-with-gpu"),
    ],
)
def test_merge_refuses_tables_that_are_not_comparable(change: dict[str, Any], field: str) -> None:
    a = make_profile((make_entry(DENSE),))
    b = make_profile((make_entry(DENSE),), **change)
    with pytest.raises(ValueError, match=field):
        merge_profiles([a, b])


def test_merged_profile_saves_and_loads(tmp_path: Path) -> None:
    merged, _ = merge_profiles([PROFILE, make_profile((make_entry(DENSE, p50=0.5),))])
    save_profile(merged, tmp_path / "m.json")
    assert load_profile(tmp_path / "m.json") == (merged, [])


# ---------------------------------------------------------------------------------------------------------------
# The incumbent: what was served before tuning (optional, typed, validated)

INCUMBENT = table.Incumbent(
    config=make_config(**{"intra.num_warps": 4}),
    timing=Timing(p20_ms=1.5, p50_ms=1.6, p80_ms=1.7, spread=0.01),
    source=table.ServedFrom.FAMILY,
    table="h100-80gb-hbm3.json",
    key="fwd/K128-V128-bf16/T4096-BH128",
)


def test_entry_with_an_incumbent_round_trips_and_says_vs_before(tmp_path: Path) -> None:
    entry = dataclasses.replace(make_entry(DENSE, p50=1.0), incumbent=INCUMBENT)
    assert entry.vs_before == pytest.approx(1.6) and not entry.kept_incumbent
    kept = dataclasses.replace(make_entry(VARLEN), config=INCUMBENT.config, incumbent=INCUMBENT)
    assert kept.kept_incumbent
    save_profile(make_profile((entry, kept)), tmp_path / "t.json")
    loaded, warnings = load_profile(tmp_path / "t.json")
    assert not warnings and loaded is not None
    assert loaded.entries[0].incumbent == INCUMBENT and loaded.entries[0].incumbent.source is table.ServedFrom.FAMILY
    assert INCUMBENT.describe() == "h100-80gb-hbm3.json fwd/K128-V128-bf16/T4096-BH128 (family)"


def test_tables_without_incumbents_load_and_save_unchanged(tmp_path: Path) -> None:
    # Tables written before the field existed (the shipped H100 table among them) load with None, and re-saving
    # an entry without one writes no "incumbent" key.
    shipped, warnings = load_profile(table.PROFILES_DIR / "h100-80gb-hbm3.json")
    assert shipped is not None and shipped.entries and all(e.incumbent is None for e in shipped.entries), warnings
    assert all(e.vs_before is None and not e.kept_incumbent for e in shipped.entries)
    assert "incumbent" not in make_entry(DENSE).to_dict()


def _with_incumbent(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        data["entries"][0]["incumbent"] = INCUMBENT.to_dict()
        _set(f"entries.0.incumbent.{path}", value)(data)

    return mutate


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        pytest.param(_with_incumbent("source", "elsewhere"), "entries[0].incumbent.source", id="unknown-source"),
        pytest.param(_with_incumbent("config.chunk", 48), "entries[0].incumbent.config.chunk", id="illegal-config"),
        pytest.param(_with_incumbent("config.intra.BC", 64), "entries[0].incumbent.config", id="infeasible-config"),
        pytest.param(_with_incumbent("timing.p50_ms", 9.0), "entries[0].incumbent.timing", id="unordered-quantiles"),
        pytest.param(_with_incumbent("table", "x" * 500), "entries[0].incumbent.table", id="huge-table-name"),
        pytest.param(_with_incumbent("key", 7), "entries[0].incumbent.key", id="key-not-a-string"),
        pytest.param(_set("entries.0.incumbent", [1]), "entries[0].incumbent", id="not-an-object"),
    ],
)
def test_bad_incumbent_skips_its_entry_with_a_warning_naming_the_field(
    mutate: Callable[[dict[str, Any]], None], field: str, tmp_path: Path
) -> None:
    path, (loaded, warnings) = _load_mutated(mutate, tmp_path)
    assert loaded is not None and len(warnings) == 1, warnings
    assert str(path) in warnings[0] and f"{field}:" in warnings[0]
    assert entry_key("fwd", DENSE) not in {e.key for e in loaded.entries}


# ---------------------------------------------------------------------------------------------------------------
# Freshness per op: one fingerprint per op in a table that holds several


DECODE = Shape(B=128, T=1, H=16, K=128, V=128, dtype="bf16")
STALE = "0123456789abcdef"


def make_decode_entry(shape: Shape = DECODE, p50: float = 0.08, **flat: Any) -> Entry:
    spec = get_spec(DECODE_OP)
    config = spec.from_flat({**spec.default_config(shape).flat(), **flat})
    return dataclasses.replace(
        make_entry(shape, p50=p50), key=entry_key(DECODE_OP, shape), stage=DECODE_OP, config=config,
        stage_ms={"step": p50}, default_stage_ms={"step": 2 * p50},
    )


def mixed_profile(decode_hash: str = STALE, **header: Any) -> Profile:
    """fwd + decode entries; fwd's fingerprint today's, decode's ``decode_hash``."""
    fingerprints = {"fwd": kernel_source_hash(), DECODE_OP: decode_hash}
    return make_profile((make_entry(DENSE), make_decode_entry()), kernel_hash=fingerprints, **header)


def test_a_table_records_one_fingerprint_per_op_and_only_the_stale_op_is_named(tmp_path: Path) -> None:
    save_profile(mixed_profile(), tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 2
    assert data["kernel_hash"] == {DECODE_OP: STALE, "fwd": kernel_source_hash()}
    loaded, warnings = load_profile(tmp_path / "t.json")
    assert loaded is not None and not warnings
    # Stale entries keep serving: both ops' entries loaded (today's constraints accept them).
    assert [e.stage for e in loaded.entries] == ["fwd", DECODE_OP]
    assert list(table.stale_ops(loaded)) == [DECODE_OP]
    (reason,) = table.staleness(loaded)
    assert reason.startswith(f"{DECODE_OP}: kernel_hash:") and STALE in reason
    assert table.staleness(loaded, "fwd") == () and table.staleness(loaded, DECODE_OP) == (reason,)
    fresh = mixed_profile(get_spec(DECODE_OP).fingerprint())
    assert table.staleness(fresh) == ()


def test_an_op_with_entries_but_no_recorded_fingerprint_is_stale() -> None:
    profile = make_profile((make_entry(DENSE), make_decode_entry()), kernel_hash={"fwd": kernel_source_hash()})
    assert list(table.stale_ops(profile)) == [DECODE_OP]
    assert "no fingerprint recorded" in table.stale_ops(profile)[DECODE_OP]


# The H100 table is still a schema-1 file (no H100 has been lent since); the H200 table was re-tuned as schema 2.
@pytest.mark.parametrize("name", ["h100-80gb-hbm3.json"])
def test_schema_1_shipped_tables_load_unchanged_with_their_hash_as_the_forwards(name: str, tmp_path: Path) -> None:
    data = json.loads((table.PROFILES_DIR / name).read_text())
    assert data["schema_version"] == 1 and isinstance(data["kernel_hash"], str)
    loaded, warnings = load_profile(table.PROFILES_DIR / name)
    assert loaded is not None and warnings == []
    assert loaded.kernel_hash == {"fwd": data["kernel_hash"]} and loaded.schema_version == SCHEMA_VERSION
    # Every entry as the file has it: same keys, same configs, same times.
    assert [e.to_dict() for e in loaded.entries] == data["entries"]
    assert len(loaded.trials) == len(data["trials"])
    # The forward is stale exactly when the file's one fingerprint is not today's.
    assert bool(table.stale_ops(loaded)) == (data["kernel_hash"] != kernel_source_hash())
    # Re-saved, it is a schema-2 table that loads to the same record.
    save_profile(loaded, tmp_path / name)
    assert json.loads((tmp_path / name).read_text())["kernel_hash"] == {"fwd": data["kernel_hash"]}
    assert load_profile(tmp_path / name) == (loaded, [])


def test_a_schema_1_table_of_another_op_assigns_its_hash_to_that_op(tmp_path: Path) -> None:
    data = make_profile((make_decode_entry(),)).to_dict()
    data.update(schema_version=1, kernel_hash=get_spec(DECODE_OP).fingerprint())
    (tmp_path / "t.json").write_text(json.dumps(data))
    loaded, warnings = load_profile(tmp_path / "t.json")
    assert loaded is not None and not warnings
    assert loaded.kernel_hash == {DECODE_OP: get_spec(DECODE_OP).fingerprint()} and not table.staleness(loaded)


def test_merging_a_tune_of_one_op_leaves_the_other_ops_alone() -> None:
    existing = mixed_profile()
    old_trial = TrialRecord(existing.entries[1].key, 0, "COMPLETE", 0.08, existing.entries[1].config.flat(), None)
    existing = dataclasses.replace(existing, trials=(*existing.trials, old_trial))
    retuned = make_decode_entry(p50=0.5, num_warps=2)  # slower than the stale one: kernels changed, no comparison
    run = make_profile((retuned,), kernel_hash={DECODE_OP: get_spec(DECODE_OP).fingerprint()})
    merged, notes = merge_profiles([existing, run], names=["existing", "this run"])
    assert merged.kernel_hash == {"fwd": kernel_source_hash(), DECODE_OP: get_spec(DECODE_OP).fingerprint()}
    assert merged.entries == (retuned, existing.entries[0])  # sorted by key
    assert any(n.startswith(f"{DECODE_OP}: existing") and "kept this run's" in n for n in notes)
    assert not table.stale_ops(merged)
    # The dropped decode entries' study history goes with them; the forward's and this run's stay.
    assert merged.trials == (*(t for t in existing.trials if t.key.startswith("fwd/")), *run.trials)


def test_merging_tables_of_the_same_fingerprints_keeps_the_faster_entry_of_each_op() -> None:
    fingerprints = {"fwd": kernel_source_hash(), DECODE_OP: get_spec(DECODE_OP).fingerprint()}
    a = make_profile((make_entry(DENSE, p50=1.0), make_decode_entry(p50=0.2)), kernel_hash=fingerprints)
    b = make_profile((make_decode_entry(p50=0.1, num_warps=2),), kernel_hash={DECODE_OP: fingerprints[DECODE_OP]})
    merged, _ = merge_profiles([a, b])
    assert merged.kernel_hash == fingerprints
    assert merged.entries == (b.entries[0], a.entries[0])  # sorted by key


def test_a_run_under_another_triton_keeps_the_table_s_other_ops_marked_stale(tmp_path: Path) -> None:
    """Tuning decode under a new Triton into a table tuned with an older one cannot merge the two (their times do
    not compare), but must not drop the table's forward entries: they are kept and recorded stale."""
    from gdn2_tune.tuner.run import merge_with_existing

    existing = make_profile((make_entry(DENSE),), triton_version="3.6.0")
    new = make_profile((make_decode_entry(),), kernel_hash={DECODE_OP: get_spec(DECODE_OP).fingerprint()})
    notes: list[str] = []
    merged = merge_with_existing(new, existing, tmp_path / "h200.json", notes)
    assert [e.stage for e in merged.entries] == [DECODE_OP, "fwd"]
    assert merged.triton_version == new.triton_version
    assert merged.kernel_hash[DECODE_OP] == get_spec(DECODE_OP).fingerprint()
    assert merged.kernel_hash["fwd"] == f"{kernel_source_hash()}@triton3.6.0"
    assert list(table.stale_ops(merged)) == ["fwd"]
    assert len(notes) == 1 and "fwd" in notes[0] and "stale" in notes[0]
    # Another device: nothing is carried over, the run's table replaces the file's (as before).
    other = make_profile((make_entry(DENSE),), device_id="a100", triton_version="3.6.0")
    notes = []
    assert merge_with_existing(new, other, tmp_path / "x.json", notes) is new
    assert "replaced" in notes[0]


def test_a_merged_table_records_the_newest_run() -> None:
    """Merging a run into an existing table keeps the entries of both, but the run's record (budget, commit,
    versions, roofs) is the newest table's: the older run's budget would describe a run that did not make it."""
    old = make_profile((make_entry(DENSE),), budget={"budget_minutes": 5.0}, git_commit="old")
    new = make_profile((make_entry(DENSE),), budget={"budget_minutes": 8.4}, git_commit="new")
    merged, _ = merge_profiles([old, new])
    assert merged.budget == {"budget_minutes": 8.4} and merged.git_commit == "new"
