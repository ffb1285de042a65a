"""transmigrate: keep Linux services running while their kernel is replaced or fails."""

__version__ = "0.1.0"
