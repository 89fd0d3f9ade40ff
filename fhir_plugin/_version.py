"""The plugin's version, in a module of its own so that pure code can name it without loading the package."""

__version__ = "0.1.0"
