"""Registry fixtures (see registry.py): an open one and one behind htpasswd (bcrypt) auth."""

from __future__ import annotations

import pytest

from tests.ship.publish.registry import PASSWORD, USER, serve


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    """A registry that wants USER / PASSWORD (basic auth, bcrypt htpasswd)."""
    bcrypt = pytest.importorskip("bcrypt")
    root = tmp_path_factory.mktemp("auth-registry")
    (root / "htpasswd").write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    yield from serve(root, f"auth:\n  htpasswd:\n    realm: kiln-tests\n    path: {root / 'htpasswd'}\n")
