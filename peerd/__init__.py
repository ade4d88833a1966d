"""peerd: a peer-to-peer daemon for decentralized LLM work on consumer GPUs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("peerd")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
