"""netbed: a full-system emulation testbed for Linux receive-path locality experiments."""

__version__ = "0.1.0"
