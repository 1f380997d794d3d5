"""An atheris target for tieaudit's safetensors header parser, for long fuzzing runs by hand (CI runs the bounded
hypothesis tests in tests/test_fuzz.py instead):

    pip install atheris
    python fuzz/fuzz_safetensors_header.py -max_total_time=600 [corpus_dir]

Only `InputError` may escape the parser; anything else is a crash atheris reports with the input that caused it.
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports():
    from tieaudit.checkpoint.safetensors_header import read_header_fd
    from tieaudit.errors import InputError


def test_one_input(data: bytes) -> None:
    fd = os.memfd_create("fuzz")
    try:
        os.write(fd, data)
        read_header_fd(fd, "fuzz.safetensors")
    except InputError:
        pass
    finally:
        os.close(fd)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
