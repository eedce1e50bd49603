"""Helpers shared by the namespace test modules."""

from __future__ import annotations

import os
import shutil

import pytest

LAB_TOOLS = ("ip", "nsenter", "unshare", "nft", "knotd", "knotc", "kdig", "nginx", "openssl", "curl")


def netns_marks(*tools: str) -> list[pytest.MarkDecorator]:
    """Marks for a module of namespace tests: root, and the tools it runs, or a clear skip."""
    missing = [t for t in tools if shutil.which(t) is None]
    return [
        pytest.mark.netns,
        pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
        pytest.mark.skipif(bool(missing), reason=f"missing tools: {', '.join(missing)}"),
    ]
