"""`status --json` is made from the typed snapshot (sptun/snapshot.py): every field that
../shared/CONTRACT.md promises is a field of those types, with the type it promises."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from sptun import snapshot

CONTRACT = Path(__file__).resolve().parent.parent.parent / "shared" / "CONTRACT.md"


def promised() -> dict[str, str]:
    """The `status --json` shapes of the contract, by role, as written there."""
    if not CONTRACT.exists():
        pytest.skip(f"{CONTRACT} is not beside this checkout")
    text = CONTRACT.read_text()
    section = text[text.index("`status --json` prints one JSON object"):]
    shapes = {}
    for role in ("agent", "server"):
        m = re.search(rf"- {role}: `(\{{.*?\}})`", section, re.S)
        assert m, f"the contract no longer shows the {role}'s status"
        shapes[role] = " ".join(m.group(1).split())
    return shapes


def keys_with_values(shape: str) -> list[tuple[str, str]]:
    """"key": VALUE pairs of the contract's sketch; VALUE is a word (IP, bool, ...), ..., [ or {."""
    return re.findall(r'"(\w+)": ("[^"]*"|\[|\{|[\w.]+)', shape)


TYPES = {"bool": bool, "IP": str, "NAME": str, "B64": str, "...": object}


def fields_of(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls, vars(snapshot))
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def nested(cls: type, key: str) -> type:
    """The element type of a list field."""
    (element,) = typing.get_args(fields_of(cls)[key])
    return element  # type: ignore[no-any-return]


@pytest.mark.parametrize("role, cls, lists", [
    ("agent", snapshot.AgentStatus, {"tunnels": snapshot.AgentStatus}),
    ("server", snapshot.ServerStatus, {"domains": snapshot.ServerStatus, "backends": snapshot.DomainStatus}),
])
def test_every_promised_field_is_in_the_snapshot_with_its_type(role: str, cls: type, lists: dict[str, type]) -> None:
    shape = promised()[role]
    level = cls
    for key, value in keys_with_values(shape):
        if key == "role":
            assert value == f'"{role}"' and fields_of(cls)["role"] is str
            continue
        if key in lists:  # the contract goes one level down into the list's elements
            level = nested(lists[key], key)
            continue
        assert key in fields_of(level), f"{role}: the contract promises {key!r}, {level.__name__} has no such field"
        kind = TYPES.get(value.strip('"'), object)
        if kind is not object:
            hint = fields_of(level)[key]
            assert hint is kind or kind in typing.get_args(hint), (key, hint, kind)


def test_the_json_is_the_snapshot_itself() -> None:
    status = snapshot.AgentStatus("app.example.test", None, "kernel", False, True, ["tcp/443"],
                                  snapshot.DnsStatus(["198.51.100.10"], None), [])
    data = snapshot.to_json(status, snapshot.DaemonStatus({"pid": 1}, 3, 0, None))
    assert data["role"] == "agent" and data["tunnels"] == [] and data["passes"] == 3
    assert set(data) == {f.name for f in dataclasses.fields(status)} | {"process", "passes", "failed_passes", "last_error"}
