"""Shared pytest fixtures."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.xenstore_standin import XenstoreStandin


@pytest.fixture
def xenstore(monkeypatch: pytest.MonkeyPatch) -> Iterator[XenstoreStandin]:
    """A running xenstored stand-in (see tests/xenstore_standin.py).

    ``xenstore.socket_path`` is dom0's socket, also exported as
    ``XENSTORED_PATH`` so that ``pyxs.Client()`` finds it;
    ``xenstore.domain_socket(n)`` connects as guest domain n.
    """
    # A short directory: Unix socket paths are limited to 107 bytes.
    tmp = tempfile.mkdtemp(prefix="xs-")
    try:
        with XenstoreStandin(f"{tmp}/socket") as standin:
            monkeypatch.setenv("XENSTORED_PATH", standin.socket_path)
            yield standin
        assert not standin.internal_errors, standin.internal_errors
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
