"""The supervisor-worker contract: what one side writes, the other reads back the same."""

from __future__ import annotations

import pytest

from torchwire.config import ServerSettings
from torchwire.errors import TorchwireError
from torchwire.fleet.contract import (
    Apply,
    Change,
    Ready,
    Region,
    RegionApply,
    RegionChange,
    WorkerSpec,
    from_message,
    to_message,
)


def test_a_worker_spec_travels_through_the_environment_unchanged() -> None:
    settings = ServerSettings(port=5000, http_port=5001, workers=3, default_model="recsys")
    spec = WorkerSpec(
        index=2,
        link_fd=7,
        unloaded=frozenset({"b", "a"}),
        cores=4,
        settings=settings,
        engines={"cpu": "/tmp/engine.sock"},
        regions=(Region("in", "/tw-in", 8, 64), Region("out", "/tw-out", 0, 32)),
    )
    environ = dict(spec.to_env())
    assert WorkerSpec.from_env(environ) == spec
    assert environ == {}  # taken out: the worker's own children do not inherit it


@pytest.mark.parametrize(
    "message",
    [
        Ready(),
        Change("load", "m"),
        Change("unload", "m"),
        Apply("unload", "m"),
        RegionChange("register", Region("in", "/tw-in", 8, 64)),
        RegionChange("unregister", Region("")),
        RegionApply("register", Region("in", "/tw-in", 0, 64)),
        RegionApply("unregister", Region("in")),
    ],
)
def test_link_messages_read_back_as_written(
    message: Ready | Change | Apply | RegionChange | RegionApply,
) -> None:
    assert from_message(to_message(message)) == message


@pytest.mark.parametrize(
    "raw",
    [
        {"op": "reboot"},
        {"op": "load"},
        {"op": "apply", "action": "drop", "model": "m"},
        {"op": "region", "action": "register", "name": "in", "key": "/k", "offset": "0"},
        {"op": "apply_region", "action": "map", "name": "in", "key": "", "offset": 0},
    ],
)
def test_a_message_outside_the_contract_is_refused_by_name(raw: dict[str, object]) -> None:
    with pytest.raises(TorchwireError) as caught:
        from_message(raw)
    assert caught.value.code == "INVALID_ARGUMENT" and "unknown link message" in str(caught.value)
