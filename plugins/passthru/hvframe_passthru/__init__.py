"""hvframe passthru plugin package."""
