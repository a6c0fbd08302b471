"""Checkpoints and migration: a machine's whole state (guest RAM, vCPUs, the in-kernel
interrupt controllers, PIT and clock, every device) to a file or a socket, and back into a
new process. See state.py (what a device declares), format.py (the file), checkpoint.py."""
