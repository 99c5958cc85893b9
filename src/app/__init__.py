"""madminer-sweeper: Hydra-configured sweeps of MadMiner's machine-learning workflow."""

import sys

__version__ = "0.1.0"


def _python312_shim() -> None:
    """Let madminer 0.9.6 import on Python 3.12+ (the GPU machines' images have 3.12; the package itself targets 3.11).

    madminer imports uproot3, whose helpers use two things Python 3.12 removed: ``FileFinder.find_module``
    (uproot3_methods walks its classes with it) and ``distutils.version.LooseVersion`` (awkward0 compares NumPy's
    version once). Both get a minimal stand-in only where they are missing; nothing else changes."""
    import importlib.machinery

    if not hasattr(importlib.machinery.FileFinder, "find_module"):

        def find_module(self, fullname, path=None):
            spec = self.find_spec(fullname)
            return spec.loader if spec is not None else None

        importlib.machinery.FileFinder.find_module = find_module
    try:
        import distutils.version  # noqa: F401  (setuptools' own stand-in, where installed)
    except ImportError:
        import types

        from packaging.version import Version

        class LooseVersion:
            def __init__(self, version):
                self.version = Version(str(version).split("+")[0])

            def __lt__(self, other):
                return self.version < other.version

            def __ge__(self, other):
                return self.version >= other.version

        version = types.ModuleType("distutils.version")
        version.LooseVersion = LooseVersion
        package = types.ModuleType("distutils")
        package.version = version
        package.__path__ = []
        sys.modules.update({"distutils": package, "distutils.version": version})


if sys.version_info >= (3, 12):
    _python312_shim()
