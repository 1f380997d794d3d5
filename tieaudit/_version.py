# The one place the version is written: pyproject.toml reads it (setuptools `attr`), and `tieaudit --version`
# prints it without importlib.metadata (which costs ~30 ms of start-up).
__version__ = "0.1.0"
