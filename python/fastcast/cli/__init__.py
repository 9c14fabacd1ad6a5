"""The ``fastcast`` command: argument parsing and printing only; it calls the API.
A module per command; ``main`` builds the parser and turns failures into one line."""

from fastcast.cli.convert import convert_options
from fastcast.cli.main import build_parser, main

__all__ = ["build_parser", "convert_options", "main"]
