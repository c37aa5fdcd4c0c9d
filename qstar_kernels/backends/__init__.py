"""Backends of the public ops. Each is swappable behind the dispatch in the op's module."""
