"""Built-in platform devices (present in every machine), offered as a plugin like any other."""
