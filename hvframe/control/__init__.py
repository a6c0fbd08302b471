"""The control plane: a running VM's name, run directory and signals (lifecycle), its QMP
monitor (qmp, monitor) and the `hvframe ctl` client (ctl)."""

# The exit reason of a run ended by the console escape (Ctrl-A x on a stdio UART); the
# lifecycle reports it to QMP clients as SHUTDOWN reason "host-ui".
CONSOLE_QUIT = "quit from the console (Ctrl-A x)"
