"""Fault injection for the decode engine's tests, never installed with dens.

Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``; the ``codec_fault`` fixture puts this folder
there, so the engine's spawned workers load it. A worker that meets a file whose base name is
``DENS_TEST_CRASH_ON`` then kills itself with SIGSEGV, as a codec crashing on a hostile file would; one that
meets ``DENS_TEST_HANG_ON`` sleeps, as a codec stuck in a loop would. Everything else decodes as usual.
"""

import importlib.abc
import importlib.util
import os
import signal
import sys
import time

CRASH_ON = os.environ.get("DENS_TEST_CRASH_ON", "")
HANG_ON = os.environ.get("DENS_TEST_HANG_ON", "")


class _FaultyLoad(importlib.abc.MetaPathFinder):
    """Wraps ``dens.route.preprocess.load`` as the module is imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "dens.route.preprocess":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            load = module.load

            def faulty_load(file, cfg=None):
                base = os.path.basename(str(file))
                if base == CRASH_ON:
                    os.kill(os.getpid(), signal.SIGSEGV)
                if base == HANG_ON:
                    time.sleep(3600)
                return load(file, cfg)

            module.load = faulty_load

        spec.loader.exec_module = exec_module
        return spec


if CRASH_ON or HANG_ON:
    sys.meta_path.insert(0, _FaultyLoad())
