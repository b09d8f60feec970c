"""Shared fixtures.

Child Python processes must import the same protobase as the test process: the installed
package in CI (where the source tree beside the tests has no compiled core), the in-place
build in a development checkout. `child_env` points PYTHONPATH at that package's parent,
and `child_cwd` is an empty folder to run children in, so that `python -c` (which puts the
current folder first on sys.path) never picks up the source tree by accident."""
import os

import pytest

import protobase

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(protobase.__file__)))


@pytest.fixture
def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [PACKAGE_PARENT, env.get("PYTHONPATH", "")] if p)
    return env


@pytest.fixture
def child_cwd(tmp_path_factory):
    return str(tmp_path_factory.mktemp("child-cwd"))
