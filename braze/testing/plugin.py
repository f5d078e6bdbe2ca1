"""pytest plugin (entry point `pytest11: braze`): the `golden` fixture and the `--braze-update-golden` option.

Loaded in every pytest session of an environment where braze is installed. Importing it imports the `braze`
package (torch, and TRITON_INTERPRET=1 on machines without CUDA); this module itself adds only the option and the
fixture. With PYTEST_DISABLE_PLUGIN_AUTOLOAD=1, enable it with `pytest -p braze`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

_REGISTRY = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("braze", "braze golden-output checks")
    group.addoption("--braze-update-golden", action="store_true", default=False,
                    help="re-record every golden snapshot the tests check (from eager_fn where given)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REGISTRY] = {}


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Any:
    """Record an eager reference once, then check compiled outputs against it.

    golden.check(name, compiled_output, eager_fn=None, *, exact=False, rtol=None, atol=None)
    Snapshots: <test dir>/golden/<test module>/<name>.safetensors. See braze.testing.golden.Golden.
    """
    from braze.testing.golden import Golden

    return Golden(Path(str(request.node.path)), request.node.nodeid,
                  update=bool(request.config.getoption("--braze-update-golden")),
                  registry=request.config.stash[_REGISTRY])
