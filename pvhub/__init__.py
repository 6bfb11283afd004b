"""pvhub: one daemon between EPICS IOCs and every client that reads or drives them."""

__version__ = "0.1.0"
__all__ = ["__version__"]
