"""llama2.c's exported model files (``model.bin``, karpathy/llama2.c ``export.py``), from the header and the file
size alone: the file's own flag says whether the classifier (the head) is the token embedding, and the size says
whether a classifier follows the other weights. Returns data for the rules in `tieaudit/rules/llama2c.py`.

- v0 (``legacy_export``, what ``train.py`` writes): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
  vocab_size, max_seq_len), no magic; a *negative* vocab_size means "not shared". float32 weights: tok_embeddings,
  the layers' norms and matrices, the final norm, ``freqs_cos`` and ``freqs_sin`` (max_seq_len * head_size / 2
  each), then ``output`` only when not shared. ``run.c`` reads exactly this, and nothing checks the size.
- v1 / v2: magic 0x616b3432 ("ak42"), version, the 7 ints (vocab_size positive), a uint8 ``shared_classifier``,
  (v2: an int32 group_size), zero-padded to 256 bytes. v1: float32 norms, then tok_embeddings and the matrices;
  v2: float32 norms, then each matrix as int8 values followed by float32 scales (one per group_size values).
  ``output`` last, only when not shared.

"Shared" is decided by ``export.py`` with ``torch.equal(tok_embeddings, output)``: a file that says shared was
exported from a model whose head equalled its embedding. What the file cannot tell: whether that model was meant to
have a separate head (a head re-tied before export is exported as shared).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tieaudit.checkpoint.safetensors_header import open_regular_file, read_exact
from tieaudit.errors import InputError

MAGIC = 0x616B3432
HEADER_V1 = 256


@dataclass(frozen=True)
class Llama2cContext:
    """What the llama2.c rules see."""

    family: ClassVar[str] = "llama2c"
    path: str
    version: int
    dim: int
    n_layers: int
    vocab: int
    shared: bool  # the file's own flag
    size: int
    without_classifier: int  # the file size the header implies without a classifier
    classifier_bytes: int

    @property
    def holds_classifier(self) -> bool:
        return self.size == self.without_classifier + self.classifier_bytes


def sniff(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file whose first bytes look like a llama2.c export (v1/v2 magic, or a plausible v0
    header whose implied size matches the file)."""
    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as f:
            head = f.read(28)
        size = os.path.getsize(path)
    except OSError:
        return False
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == MAGIC:
        return True
    if len(head) < 28:
        return False
    try:
        layout = _v0_layout(struct.unpack("<7i", head), "")
    except InputError:
        return False
    return size in (layout[0], layout[0] + layout[1])


def _check_dims(dim: int, hidden: int, layers: int, heads: int, kv: int, vocab: int, seq: int, label: str) -> None:
    if min(dim, hidden, layers, heads, kv, vocab, seq) <= 0 or dim % heads or heads % kv or dim > 1 << 20:
        raise InputError(f"{label}: not a llama2.c model header (dim {dim}, heads {heads}, kv heads {kv})")
    if layers > 4096 or vocab > 1 << 24 or seq > 1 << 24 or hidden > 1 << 22:
        raise InputError(f"{label}: not a llama2.c model header (implausible sizes)")


def _matrices(dim: int, hidden: int, layers: int, heads: int, kv: int) -> list[int]:
    """Element counts of every layer matrix, in export order (wq, wk, wv, wo, w1, w2, w3 for each layer in turn)."""
    kv_dim = dim * kv // heads
    per = [dim * dim, dim * kv_dim, dim * kv_dim, dim * dim, hidden * dim, dim * hidden, hidden * dim]
    out = []
    for i in range(7):
        out += [per[i]] * layers
    return out


def _v0_layout(ints: tuple[int, ...], label: str) -> tuple[int, int]:
    """(bytes without the classifier, classifier bytes) of a v0 file."""
    dim, hidden, layers, heads, kv, vocab, seq = ints
    _check_dims(dim, hidden, layers, heads, kv, abs(vocab), seq, label)
    v = abs(vocab)
    head_size = dim // heads
    floats = v * dim + 2 * layers * dim + sum(_matrices(dim, hidden, layers, heads, kv)) + dim
    floats += 2 * seq * head_size // 2
    return 28 + 4 * floats, 4 * v * dim


def read_llama2c(path: str) -> Llama2cContext:
    label = path
    fd = open_regular_file(Path(path), label)
    try:
        size = os.fstat(fd).st_size
        head = bytes(read_exact(fd, 0, min(size, HEADER_V1), label))
    finally:
        os.close(fd)
    if len(head) >= 8 and struct.unpack("<I", head[:4])[0] == MAGIC:
        version = struct.unpack("<i", head[4:8])[0]
        if version not in (1, 2) or len(head) < 41:
            raise InputError(f"{label}: llama2.c magic with version {version} (1 and 2 are known)")
        dim, hidden, layers, heads, kv, vocab, seq = struct.unpack("<7i", head[8:36])
        _check_dims(dim, hidden, layers, heads, kv, vocab, seq, label)
        shared = head[36] != 0
        norms = 4 * (2 * layers * dim + dim)
        mats = [vocab * dim, *_matrices(dim, hidden, layers, heads, kv)]
        if version == 1:
            body, classifier = norms + 4 * sum(mats), 4 * vocab * dim
        else:
            group = struct.unpack("<i", head[37:41])[0]
            if group <= 0 or dim % group:
                raise InputError(f"{label}: llama2.c v2 group_size {group} does not divide dim {dim}")
            body = norms + sum(n + 4 * (n // group) for n in mats)
            classifier = vocab * dim + 4 * (vocab * dim // group)
        without = HEADER_V1 + body
    else:
        if len(head) < 28:
            raise InputError(f"{label}: not a llama2.c model file (too short)")
        ints = struct.unpack("<7i", head[:28])
        without, classifier = _v0_layout(ints, label)
        version, vocab, shared = 0, abs(ints[5]), ints[5] > 0
        dim, layers = ints[0], ints[2]
    if size not in (without, without + classifier):
        raise InputError(
            f"{label}: a llama2.c v{version} file of {size} bytes, but its header implies {without} (classifier "
            f"shared) or {without + classifier} (classifier stored): truncated or not this format"
        )
    return Llama2cContext(path, version, dim, layers, vocab, shared, size, without, classifier)
