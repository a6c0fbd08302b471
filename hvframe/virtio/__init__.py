"""Virtio (1.2) device-side building blocks."""
from .virtqueue import Chain, VirtQueue, VirtqueueError

__all__ = ["Chain", "VirtQueue", "VirtqueueError"]
