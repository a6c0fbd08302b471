"""Block layer shared by the disk devices (virtio-blk, AHCI): raw image backends and a
worker pool that runs requests off the vCPU threads."""
from .backend import (BLOCK_OPTIONS, BLOCK_POSITIONAL, BlockBackend, BlockError, BlockOptions, BlockQueue,
                      open_from_options, parse_sectorsize)

__all__ = ["BLOCK_OPTIONS", "BLOCK_POSITIONAL", "BlockBackend", "BlockError", "BlockOptions", "BlockQueue",
           "open_from_options", "parse_sectorsize"]
