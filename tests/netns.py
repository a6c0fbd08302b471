"""Moved to hvframe.testing.netns (the home of test tooling); `import netns` still finds it."""
import sys

from hvframe.testing import netns as _moved

sys.modules[__name__] = _moved
