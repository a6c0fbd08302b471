"""hvframe virtio_net plugin package."""
