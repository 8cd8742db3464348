"""Runs `aim-serve ARGS...` as on a machine with only the client install (`pip install aim-serve`): every module
named in $AIM_BLOCKED_MODULES (comma-separated top-level names) fails to import, as it would if absent."""

import importlib.abc
import os
import sys

BLOCKED = set(filter(None, os.environ["AIM_BLOCKED_MODULES"].split(",")))


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Absent())

from cli.main import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
