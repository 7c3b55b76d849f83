"""The component must be built (scripts/build-component); scripts/test builds it first."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mandate  # noqa: E402


def pytest_configure(config):
    path = mandate.default_component_path()
    if not path.is_file():
        msg = f"{path} does not exist (run scripts/build-component)"
        if os.environ.get("MANDATE_REQUIRE_ENVOY"):
            raise pytest.UsageError(msg)
        config.addinivalue_line("markers", "skipall: component missing")
        config._mandate_missing = msg


def pytest_collection_modifyitems(config, items):
    msg = getattr(config, "_mandate_missing", None)
    if msg:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=msg))
