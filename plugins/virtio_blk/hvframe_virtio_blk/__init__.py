"""hvframe virtio_blk plugin package."""
