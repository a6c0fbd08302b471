"""hvframe ahci plugin package."""
