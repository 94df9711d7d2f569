"""Suite-wide setup: the tests plan with the documented default device profile whatever this machine has
calibrated. A developer's cached calibration (`~/.cache/runlora_fx`) would otherwise change which programs and
forms the planner picks (`planner.orient` uses only measured gains), so a test could pass here and fail on a fresh
CI machine, or the other way round. Tests that calibrate write into this session's own directory."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_profile_cache(tmp_path_factory):
    import runlora_fx.planner.device as device

    patch = pytest.MonkeyPatch()
    patch.setenv("RUNLORA_FX_CACHE", str(tmp_path_factory.mktemp("runlora_fx_cache")))
    device._loaded.clear()
    yield
    patch.undo()
    device._loaded.clear()
