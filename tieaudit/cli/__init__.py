"""The thin command-line layer (typer). No torch or transformers import happens here."""
