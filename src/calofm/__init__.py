"""calofm: a foundation model for calorimeter shower simulation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("calofm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
