"""The dispatcher (profiles/dispatch.py): lookup precedence, nearest bucket, fallbacks, hostile tables, memo.

Every test runs against temporary table directories with the GPU detection replaced, so the shipped tables of
the repository and the machine the tests run on do not matter.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import triton

import gdn2_tune
import gdn2_tune.kernels.chunk as chunk_module
import gdn2_tune.kernels.spec as spec_module
from gdn2_tune import ops
from gdn2_tune.kernels.config import FwdConfig, Shape, default_config, infeasibility
from gdn2_tune.kernels.inputs import make_inputs
from gdn2_tune.kernels.spec import get_spec
from gdn2_tune.profiles import dispatch
from gdn2_tune.profiles.dispatch import ENV_CONFIG, ENV_PROFILE, Device, TableWarning, clear_cache, select_config
from gdn2_tune.profiles.table import (
    SCHEMA_VERSION,
    DeviceInfo,
    Entry,
    Profile,
    Timing,
    entry_key,
    kernel_source_hash,
    save_profile,
)

H100 = Device("h100-80gb-hbm3", "sm90")
DENSE = Shape(B=8, T=4096, H=16, K=128, V=128, dtype="bf16")


def make_config(shape: Shape = DENSE, **flat: Any) -> FwdConfig:
    config = FwdConfig.from_flat({**default_config(shape).flat(), **flat})
    assert infeasibility(config, shape) is None
    return config


# One distinguishable config per source, so that a test can tell which source answered.
FORCED = make_config(chunk=32)
USER = make_config(**{"state.num_warps": 8})
SHIPPED = make_config(**{"state.num_stages": 3})
FAMILY = make_config(**{"intra.num_warps": 8})
OTHER_FAMILY = make_config(**{"intra.num_stages": 2})
DEFAULT = default_config(DENSE)


def make_entry(shape: Shape, config: FwdConfig) -> Entry:
    return Entry(
        key=entry_key("fwd", shape),
        stage="fwd",
        shape=shape,
        config=config,
        timing=Timing(p20_ms=0.9, p50_ms=1.0, p80_ms=1.1, spread=0.02),
        default_timing=Timing(p20_ms=1.8, p50_ms=2.0, p80_ms=2.2, spread=0.03),
        speedup=2.0,
        stage_ms={"intra": 0.4, "state": 0.6},
        default_stage_ms={"intra": 0.8, "state": 1.2},
        baseline_ms=None,
        trials=10,
        failed=0,
        pruned=1,
    )


def make_profile(entries: list[Entry], device: Device = H100, **header: Any) -> Profile:
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "device": DeviceInfo(
            device.device_id, device.device_id.upper(), device.family, (9, 0), 132, None, None, None, None
        ),
        "torch_version": torch.__version__,
        "triton_version": triton.__version__,
        "kernel_hash": kernel_source_hash(),
        "created": "2026-11-26T20:00:00+00:00",
        "sampler": "tpe",
        "budget": {"trials": 10},
        "interpret": False,
        "roofs": None,
        "entries": tuple(entries),
        "trials": (),
    }
    return Profile(**{**fields, **header})


@dataclass
class World:
    """Temporary table directories, environment and GPU detection for one test."""

    root: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def shipped(self) -> Path:
        return self.root / "shipped"

    def on_device(self, device: Device | None) -> None:
        self.monkeypatch.setattr(dispatch, "_running_device", lambda: device)

    def ship(self, profile: Profile) -> Path:
        path = self.shipped / f"{profile.device.device_id}.json"
        save_profile(profile, path)
        return path

    def user_table(self, content: Profile | str | None = None) -> Path:
        path = self.root / "user.json"
        if isinstance(content, Profile):
            save_profile(content, path)
        elif content is not None:
            path.write_text(content)
        self.monkeypatch.setenv(ENV_PROFILE, str(path))
        return path

    def force(self, config: FwdConfig | str) -> None:
        text = config if isinstance(config, str) else json.dumps(config.to_dict())
        self.monkeypatch.setenv(ENV_CONFIG, text)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    clear_cache()
    monkeypatch.setattr(dispatch, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    monkeypatch.delenv(ENV_PROFILE, raising=False)
    (tmp_path / "shipped").mkdir()
    w = World(tmp_path, monkeypatch)
    w.on_device(H100)
    yield w
    clear_cache()


def lookup(shape: Shape) -> tuple[FwdConfig, list[str]]:
    """The dispatcher's answer and the table warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = select_config(shape)
    assert infeasibility(config, shape) is None, "the dispatcher returned a config that cannot run"
    return config, [str(w.message) for w in caught if issubclass(w.category, TableWarning)]


# ---------------------------------------------------------------------------------------------------------------
# Precedence


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        pytest.param({"config", "user", "shipped", "family"}, FORCED, id="env-config-beats-every-table"),
        pytest.param({"user", "shipped", "family"}, USER, id="user-table-beats-shipped"),
        pytest.param({"shipped", "family"}, SHIPPED, id="shipped-table-of-this-gpu-beats-family"),
        pytest.param({"family"}, FAMILY, id="same-family-table-beats-default"),
        pytest.param(set(), DEFAULT, id="default-when-no-table-applies"),
    ],
)
def test_lookup_precedence(sources: set[str], expected: FwdConfig, world: World) -> None:
    # A table of another architecture has the exact key at every step and must never be used.
    world.ship(make_profile([make_entry(DENSE, OTHER_FAMILY)], Device("a100-sxm4-80gb", "sm80")))
    if "config" in sources:
        world.force(FORCED)
    if "user" in sources:
        world.user_table(make_profile([make_entry(DENSE, USER)]))
    if "shipped" in sources:
        world.ship(make_profile([make_entry(DENSE, SHIPPED)]))
    if "family" in sources:
        world.ship(make_profile([make_entry(DENSE, FAMILY)], Device("h200", "sm90")))
    assert lookup(DENSE)[0] == expected


def test_missing_table_for_this_gpu_warns_once_and_uses_its_family(world: World) -> None:
    world.ship(make_profile([make_entry(DENSE, FAMILY)], Device("h200", "sm90")))
    config, messages = lookup(DENSE)
    assert config == FAMILY
    assert len(messages) == 1 and "h100-80gb-hbm3.json" in messages[0] and "tune.py tune" in messages[0]
    assert lookup(Shape(B=1, T=64, H=2, K=128, V=128))[1] == []


def test_no_shipped_table_is_used_on_cpu(world: World) -> None:
    world.on_device(None)
    world.ship(make_profile([make_entry(DENSE, SHIPPED)]))
    assert lookup(DENSE) == (DEFAULT, [])


def test_user_table_applies_on_cpu(world: World) -> None:
    world.on_device(None)
    world.user_table(make_profile([make_entry(DENSE, USER)]))
    assert lookup(DENSE) == (USER, [])


def test_user_table_of_another_gpu_is_used_with_a_warning(world: World) -> None:
    path = world.user_table(make_profile([make_entry(DENSE, USER)], Device("h200", "sm90")))
    config, messages = lookup(DENSE)
    assert config == USER
    assert len(messages) == 1 and str(path) in messages[0] and "device.device_id" in messages[0]


# ---------------------------------------------------------------------------------------------------------------
# GDN2_CONFIG


def test_forced_config_that_cannot_run_at_a_shape_is_ignored_there_only(world: World) -> None:
    world.on_device(None)
    wide = make_config(**{"intra.BV": 64, "state.BV": 128, "state.num_warps": 8})
    world.force(wide)
    narrow = Shape(B=1, T=64, H=2, K=64, V=64)
    config, messages = lookup(narrow)
    assert config == default_config(narrow)
    assert len(messages) == 1 and ENV_CONFIG in messages[0] and "state.BV=128" in messages[0]
    assert lookup(DENSE) == (wide, [])


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param("{chunk: 32", "invalid JSON", id="bad-json"),
        pytest.param(json.dumps({**FORCED.to_dict(), "chunk": 7}), f"{ENV_CONFIG}.chunk", id="illegal-chunk"),
        pytest.param(json.dumps({"chunk": 64}), ENV_CONFIG, id="missing-stages"),
        pytest.param("[64]", ENV_CONFIG, id="not-an-object"),
    ],
)
def test_invalid_forced_config_warns_once_and_falls_through(text: str, field: str, world: World) -> None:
    world.force(text)
    world.user_table(make_profile([make_entry(DENSE, USER)]))
    config, messages = lookup(DENSE)
    assert config == USER
    assert len(messages) == 1 and field in messages[0]
    assert lookup(Shape(B=1, T=64, H=2, K=128, V=128))[1] == []


# ---------------------------------------------------------------------------------------------------------------
# Nearest bucket


def _flavour(i: int) -> FwdConfig:
    """The i-th of a few configs that all run at K = V = 128, to tell the buckets apart."""
    warps, stages = divmod(i, 3)
    return make_config(**{"state.num_warps": (2, 4, 8)[warps], "state.num_stages": (1, 2, 3)[stages]})


BUCKETS = {
    "T1024-BH32": (Shape(B=2, T=1024, H=16, K=128, V=128), _flavour(0)),
    "T4096-BH128": (Shape(B=8, T=4096, H=16, K=128, V=128), _flavour(1)),
    "T16384-BH128": (Shape(B=8, T=16384, H=16, K=128, V=128), _flavour(2)),
    "varlen-T16384-N2-H16": (Shape(B=1, T=16384, H=16, K=128, V=128, num_seqs=2), _flavour(3)),
    "fp16-T4096-BH128": (Shape(B=8, T=4096, H=16, K=128, V=128, dtype="fp16"), _flavour(4)),
    "K64-V64-T4096-BH128": (Shape(B=8, T=4096, H=16, K=64, V=64), make_config(Shape(1, 64, 1, 64, 64), chunk=32)),
    # Few rows along a long sequence: the other side of kernels/config.py's sequence_split_regime.
    "split-T32768-BH16": (Shape(B=1, T=32768, H=16, K=128, V=128), _flavour(5)),
}


@pytest.mark.parametrize(
    ("shape", "bucket"),
    [
        pytest.param(Shape(B=8, T=4096, H=16, K=128, V=128), "T4096-BH128", id="exact-key"),
        pytest.param(Shape(B=4, T=4096, H=32, K=128, V=128), "T4096-BH128", id="same-bucket-other-B-H-split"),
        pytest.param(Shape(B=8, T=6000, H=16, K=128, V=128), "T4096-BH128", id="nearest-in-log2-T"),
        pytest.param(Shape(B=2, T=2048, H=16, K=128, V=128), "T1024-BH32", id="nearest-in-log2-T-and-BH"),
        pytest.param(Shape(B=16, T=65536, H=16, K=128, V=128), "T16384-BH128", id="beyond-the-largest-bucket"),
        pytest.param(Shape(B=1, T=1, H=1, K=128, V=128), "T1024-BH32", id="single-token"),
        pytest.param(
            Shape(B=1, T=32768, H=16, K=128, V=128, num_seqs=4), "varlen-T16384-N2-H16", id="varlen-prefers-varlen"
        ),
        pytest.param(
            Shape(B=1, T=32768, H=16, K=128, V=128, num_seqs=8),
            "T4096-BH128",
            id="varlen-takes-the-dense-bucket-of-the-same-sequences",
        ),
        pytest.param(Shape(B=8, T=16384, H=16, K=128, V=128, dtype="fp16"), "fp16-T4096-BH128", id="dtype-must-match"),
        pytest.param(Shape(B=1, T=100, H=3, K=64, V=64), "K64-V64-T4096-BH128", id="head-dims-must-match"),
        pytest.param(Shape(B=8, T=4096, H=16, K=96, V=128), None, id="no-bucket-with-these-head-dims"),
        pytest.param(Shape(B=1, T=65536, H=8, K=128, V=128), "split-T32768-BH16", id="split-regime-takes-its-own"),
        pytest.param(Shape(B=4, T=32768, H=16, K=128, V=128), "T16384-BH128", id="many-rows-skip-the-split-bucket"),
        pytest.param(Shape(B=8, T=4096, H=16, K=128, V=128, dtype="fp32"), None, id="no-bucket-with-this-dtype"),
    ],
)
def test_nearest_bucket(shape: Shape, bucket: str | None, world: World) -> None:
    world.on_device(None)
    world.user_table(make_profile([make_entry(s, c) for s, c in BUCKETS.values()]))
    expected = BUCKETS[bucket][1] if bucket else default_config(shape)
    assert lookup(shape) == (expected, [])


def test_no_bucket_across_the_sequence_split(world: World) -> None:
    # An entry tuned for many rows carries no sequence split; served as the nearest bucket at one long sequence it
    # denied the backward its split (H200, 2026-11-30). Across the regime the shape-aware default serves instead.
    world.on_device(None)
    world.user_table(make_profile([make_entry(s, c) for k, (s, c) in BUCKETS.items() if not k.startswith("split")]))
    shape = Shape(B=1, T=32768, H=16, K=128, V=128)
    assert lookup(shape) == (default_config(shape), [])
    assert default_config(shape).state.segment_chunks > 0


@pytest.mark.parametrize(
    ("shape", "same_kind"),
    [
        pytest.param(Shape(B=1, T=32768, H=16, K=128, V=128, num_seqs=8), 0, id="varlen-query"),
        pytest.param(Shape(B=8, T=4096, H=16, K=128, V=128), 1, id="dense-query"),
    ],
)
def test_same_kind_wins_at_equal_distance(shape: Shape, same_kind: int, world: World) -> None:
    # Both buckets are one doubling of T away from 4096 tokens per sequence and 128 sequence-heads; the keys sort
    # the other way, so only the preference for the same kind (packed or padded) picks the right one.
    varlen = Shape(B=1, T=65536, H=16, K=128, V=128, num_seqs=8)
    dense = Shape(B=8, T=2048, H=16, K=128, V=128)
    if same_kind:
        varlen, dense = Shape(B=1, T=16384, H=16, K=128, V=128, num_seqs=8), Shape(B=8, T=8192, H=16, K=128, V=128)
    world.on_device(None)
    world.user_table(make_profile([make_entry(varlen, _flavour(0)), make_entry(dense, _flavour(1))]))
    assert lookup(shape)[0] == _flavour(same_kind)


def test_nearest_bucket_ignores_other_stages(world: World) -> None:
    # A table may hold several ops' entries; the forward's lookup must not serve another op's config. The other op
    # is the forward's spec under another name: its entries validate, only their stage differs.
    world.monkeypatch.setitem(spec_module._REGISTRY, "bwd", dataclasses.replace(get_spec("fwd"), name="bwd"))
    other = make_entry(Shape(B=8, T=4096, H=16, K=128, V=128), USER)
    other = Entry(**{**other.__dict__, "stage": "bwd", "key": entry_key("bwd", other.shape)})
    world.user_table(make_profile([other]))
    assert lookup(DENSE)[0] == DEFAULT


def test_user_table_nearest_bucket_beats_shipped_exact_key(world: World) -> None:
    world.user_table(make_profile([make_entry(Shape(B=8, T=1024, H=16, K=128, V=128), USER)]))
    world.ship(make_profile([make_entry(DENSE, SHIPPED)]))
    assert lookup(DENSE)[0] == USER


def test_a_config_infeasible_at_the_query_falls_through(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # No current constraint depends on T, so stand one in: this guards the check every answer must pass.
    fwd = get_spec("fwd")

    def not_too_long(cfg: Any, shape: Shape, device: Any) -> str | None:
        return "too long" if cfg == USER and shape.T > 8192 else None

    monkeypatch.setitem(spec_module._REGISTRY, "fwd", dataclasses.replace(fwd, constraints=(*fwd.constraints, not_too_long)))
    world.user_table(make_profile([make_entry(DENSE, USER)]))
    world.ship(make_profile([make_entry(DENSE, SHIPPED)]))
    long = Shape(B=8, T=16384, H=16, K=128, V=128)
    config, messages = lookup(long)
    assert config == SHIPPED
    assert len(messages) == 1 and "user.json" in messages[0] and "too long" in messages[0]


# ---------------------------------------------------------------------------------------------------------------
# Stale, corrupt and malicious tables


@pytest.mark.parametrize(
    ("header", "field"),
    [
        pytest.param({"triton_version": "2.0.0"}, "triton_version", id="other-triton-version"),
        pytest.param({"kernel_hash": "0" * 16}, "kernel_hash", id="other-kernel-sources"),
    ],
)
def test_stale_table_warns_naming_file_and_field_and_keeps_serving(
    header: dict[str, Any], field: str, world: World
) -> None:
    # Load has already dropped what today's constraints reject, so a stale table's entries are legal: serving
    # them beats falling back to another table or the default; the warning asks for a re-tune.
    path = world.user_table(make_profile([make_entry(DENSE, USER)], **header))
    world.ship(make_profile([make_entry(DENSE, SHIPPED)]))
    config, messages = lookup(DENSE)
    assert config == USER
    assert len(messages) == 1 and str(path) in messages[0] and f"{field}:" in messages[0]
    assert "stale" in messages[0] and "tune.py tune" in messages[0]


def test_stale_table_drops_entries_that_todays_constraints_reject(world: World) -> None:
    data = make_profile([make_entry(DENSE, USER)], kernel_hash="0" * 16).to_dict()
    illegal = json.loads(json.dumps(data["entries"][0]))
    illegal["key"] = illegal["key"].replace("T4096", "T8192")
    illegal["config"]["chunk"], illegal["config"]["intra"]["BC"] = 32, 64  # BC must divide the chunk
    data["entries"].append(illegal)
    path = world.user_table(json.dumps(data))
    config, messages = lookup(DENSE)
    assert config == USER
    assert any("BC" in m and str(path) in m for m in messages)


def test_only_the_stale_op_of_a_table_warns_and_both_keep_serving(world: World) -> None:
    decode = get_spec("decode")
    step = Shape(B=128, T=1, H=16, K=128, V=128, dtype="bf16")
    tuned = decode.from_flat({**decode.default_config(step).flat(), "num_warps": 8})  # not the default's 4
    decode_entry = dataclasses.replace(
        make_entry(step, USER), key=entry_key("decode", step), stage="decode", config=tuned,
        stage_ms={"step": 0.05}, default_stage_ms={"step": 0.1},
    )
    path = world.user_table(make_profile(
        [make_entry(DENSE, USER), decode_entry], kernel_hash={"fwd": kernel_source_hash(), "decode": "0" * 16}
    ))
    config, messages = lookup(DENSE)
    assert config == USER and messages == []  # the forward's entries are fresh
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_config(step, "decode") == tuned
        assert select_config(dataclasses.replace(step, B=64), "decode") == tuned  # one warning per table and op
    (message,) = [str(w.message) for w in caught if issubclass(w.category, TableWarning)]
    assert str(path) in message and "decode entries stale" in message and "decode: kernel_hash:" in message
    assert "fwd" not in message and "--op decode" in message


@pytest.mark.parametrize("name", ["h100-80gb-hbm3.json", "h200.json"])
def test_shipped_tables_serve_their_own_forward_entries(name: str, world: World) -> None:
    # Read from the repository as they are (the H100's a schema-1 file, the H200's schema 2), every forward entry is
    # served at its own shape on its own GPU.
    shipped = dispatch.PROFILES_DIR / name
    data = json.loads(shipped.read_text())
    forward = [item for item in data["entries"] if item["key"].startswith("fwd/")]
    assert forward
    world.monkeypatch.setattr(dispatch, "SHIPPED_DIR", dispatch.PROFILES_DIR)
    world.on_device(Device(data["device"]["device_id"], data["device"]["family"]))
    for item in forward:
        shape = Shape(**item["shape"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TableWarning)  # stale for Triton 3.6 (and the H100's kernels)
            choice = dispatch.explain(shape)
        assert (choice.source, choice.path, choice.key, choice.exact) == ("own", shipped, item["key"], True)
        assert choice.config == FwdConfig.from_dict(item["config"])


def _mangled(edit: Callable[[dict[str, Any]], None]) -> Callable[[], str]:
    def text() -> str:
        data = make_profile([make_entry(DENSE, USER)]).to_dict()
        edit(data)
        return json.dumps(data)

    return text


def _entry(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        for dotted, value in fields.items():
            node = data["entries"][0]
            *parents, last = dotted.split("__")
            for part in parents:
                node = node[part]
            node[last] = value

    return edit


HOSTILE_TABLES = [
    pytest.param(lambda: "{not json", "invalid JSON", id="bad-json"),
    pytest.param(_mangled(lambda d: d.update(schema_version=99)), "schema_version", id="unknown-schema-version"),
    pytest.param(_mangled(_entry(config__intra__BK=4096)), "entries[0].config.intra.BK", id="absurd-tile-BK4096"),
    pytest.param(_mangled(_entry(config__chunk=7)), "entries[0].config.chunk", id="absurd-chunk-7"),
    pytest.param(_mangled(_entry(timing__p50_ms=-1.0)), "entries[0].timing.p50_ms", id="negative-timing"),
    pytest.param(
        _mangled(lambda d: d["device"].update(device_id="../../etc/passwd")), "device.device_id", id="device-id-dotdot"
    ),
    pytest.param(_mangled(_entry(shape__T="4096")), "entries[0].shape.T", id="wrong-type-string-T"),
    pytest.param(_mangled(lambda d: d.update(entries="all")), "entries", id="wrong-type-entries"),
    pytest.param(_mangled(lambda d: d.update(interpret=None)), "interpret", id="wrong-type-null-bool"),
]


@pytest.mark.parametrize(("content", "field"), HOSTILE_TABLES)
def test_corrupt_user_table_warns_naming_file_and_field_and_falls_back(
    content: Callable[[], str], field: str, world: World
) -> None:
    path = world.user_table(content())
    world.ship(make_profile([make_entry(DENSE, SHIPPED)]))
    config, messages = lookup(DENSE)
    assert config == SHIPPED
    assert len(messages) == 1 and str(path) in messages[0] and field in messages[0]


@pytest.mark.parametrize(("content", "field"), HOSTILE_TABLES)
def test_corrupt_shipped_table_warns_and_falls_back_to_family(
    content: Callable[[], str], field: str, world: World
) -> None:
    path = world.shipped / f"{H100.device_id}.json"
    path.write_text(content())
    world.ship(make_profile([make_entry(DENSE, FAMILY)], Device("h200", "sm90")))
    config, messages = lookup(DENSE)
    assert config == FAMILY
    assert len(messages) == 1 and str(path) in messages[0] and field in messages[0]


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_user_table_warns_and_falls_back(kind: str, world: World) -> None:
    path = world.user_table()
    if kind == "directory":
        path.mkdir()
    world.ship(make_profile([make_entry(DENSE, SHIPPED)]))
    config, messages = lookup(DENSE)
    assert config == SHIPPED
    assert len(messages) == 1 and str(path) in messages[0] and "cannot be read" in messages[0]


def test_shipped_table_holding_another_device_is_not_used(world: World) -> None:
    path = world.shipped / f"{H100.device_id}.json"
    save_profile(make_profile([make_entry(DENSE, SHIPPED)], Device("h200", "sm90")), path)
    config, messages = lookup(DENSE)
    # A mis-named file is not trusted as a family table either: its name and content disagree.
    assert config == DEFAULT
    assert len(messages) == 1 and str(path) in messages[0] and "device.device_id" in messages[0]


def test_gpu_name_with_dotdot_cannot_reach_outside_the_table_directory(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # the real _running_device, reading a fake GPU below
    monkeypatch.setattr(dispatch, "SHIPPED_DIR", world.shipped)
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    monkeypatch.delenv(ENV_PROFILE, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "../etc/passwd")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    # Where a naive `SHIPPED_DIR / (name + ".json")` would land.
    planted = world.root / "etc" / "passwd.json"
    save_profile(make_profile([make_entry(DENSE, USER)], Device("passwd", "sm90")), planted)
    assert dispatch._running_device() == Device("etc-passwd", "sm90")
    config, messages = lookup(DENSE)
    assert config == DEFAULT
    assert len(messages) == 1 and str(world.shipped / "etc-passwd.json") in messages[0]


def test_interpreter_means_no_gpu_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dispatch._running_device() is None


def test_each_problem_warns_once_however_many_shapes_hit_it(world: World) -> None:
    world.user_table("{not json")
    world.force("{bad")
    shapes = [Shape(B=b, T=t, H=4, K=128, V=128) for b in (1, 2) for t in (64, 1000, 4096)]
    messages = [m for shape in shapes for m in lookup(shape)[1]]
    assert len(messages) == 3  # the user table, GDN2_CONFIG, and the missing table for this GPU
    assert sum("user.json" in m for m in messages) == 1 and sum(ENV_CONFIG in m for m in messages) == 1


# ---------------------------------------------------------------------------------------------------------------
# Caching


def test_tables_load_once_and_lookups_are_memoised(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.user_table(make_profile([make_entry(DENSE, USER)]))
    world.ship(make_profile([make_entry(Shape(B=1, T=64, H=2, K=64, V=64), make_config(Shape(1, 64, 2, 64, 64)))]))
    loads: list[Path] = []
    resolves: list[Shape] = []
    real_load, real_resolve = dispatch.load_profile, dispatch._resolve
    monkeypatch.setattr(dispatch, "load_profile", lambda path: loads.append(path) or real_load(path))
    monkeypatch.setattr(dispatch, "_resolve", lambda shape, op: resolves.append(shape) or real_resolve(shape, op))

    first = select_config(DENSE)
    assert select_config(DENSE) is first
    assert len(resolves) == 1 and len(loads) == 1

    # Other shapes fall through to the shipped table: each file is read once, whatever the number of shapes.
    for t in (64, 128, 256):
        select_config(Shape(B=1, T=t, H=2, K=64, V=64))
    assert sorted(p.name for p in loads) == ["h100-80gb-hbm3.json", "user.json"]

    clear_cache()
    select_config(DENSE)
    assert len(loads) == 3


# ---------------------------------------------------------------------------------------------------------------
# The op asks the dispatcher


def test_chunk_gdn2_without_config_launches_the_dispatched_one(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # The public op (gdn2_tune/ops.py) asks the dispatcher; the kernels-level op never reads a table.
    shape = Shape(B=1, T=40, H=2, K=32, V=16, dtype="fp32")
    chosen = make_config(shape, **{"state.num_warps": 2})
    assert chosen != default_config(shape)
    world.user_table(make_profile([make_entry(shape, chosen)]))
    launched: list[FwdConfig] = []
    monkeypatch.setattr(chunk_module, "chunk_gdn2_fwd", lambda *a, config, **kw: launched.append(config))
    inputs = make_inputs(shape, "cpu", 0, initial_state=False)
    with torch.no_grad():
        gdn2_tune.chunk_gdn2(*inputs.args())
        chunk_module.chunk_gdn2(*inputs.args())
    assert launched == [chosen, default_config(shape)]


def test_the_package_exports_the_dispatched_op() -> None:
    assert gdn2_tune.chunk_gdn2 is ops.chunk_gdn2
    assert gdn2_tune.kernels.chunk_gdn2 is chunk_module.chunk_gdn2


def test_the_forward_s_forced_config_leaves_other_ops_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """GDN2_CONFIG forces the forward only; another op reads GDN2_CONFIG_<OP> and, without it, warns about
    nothing and serves its usual config."""
    from gdn2_tune.profiles import dispatch

    monkeypatch.setenv(ENV_CONFIG, json.dumps(FORCED.to_dict()))
    monkeypatch.delenv(dispatch.env_config_name("decode"), raising=False)
    clear_cache()
    shape = Shape(8, 1, 16, 128, 128, "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TableWarning)
        decode = select_config(shape, "decode")
    assert type(decode).__name__ == "DecodeConfig"
    assert dispatch.env_config_name("decode") == "GDN2_CONFIG_DECODE"
    assert select_config(DENSE) == FORCED
    clear_cache()
