"""Shared test settings."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Deterministic fuzzing; SPTUN_FUZZ_EXAMPLES=20000 for a longer run. Costly strategies use a fraction.
settings.register_profile("sptun", max_examples=int(os.environ.get("SPTUN_FUZZ_EXAMPLES", "2000")),
                          derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sptun")
