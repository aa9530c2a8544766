"""A fleet asked for without Ray installed: the service does not start, and says what to install;
one machine never imports Ray."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from api.fleet.fleet import _ray


def test_a_fleet_without_ray_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # What Python finds when Ray is absent but a folder named "ray" is on the path (Ray's own
    # session folder under /tmp, say): a namespace package with nothing in it.
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    with pytest.raises(RuntimeError, match=r"api\[fleet\]"):
        _ray()


def test_one_machine_never_imports_ray() -> None:
    code = "import sys, api.app; print('ray' in sys.modules)"
    answer = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert answer.stdout.strip() == "False"
