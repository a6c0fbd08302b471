"""virtio-rng for hvframe (virtio 1.2 section 5.4)."""
