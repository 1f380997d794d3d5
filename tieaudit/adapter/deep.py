"""`--deep`: confirm the forecast on the user's own model with the real libraries.

Loads the base with transformers, attaches the adapter with peft, runs seeded probe inputs, merges with
`merge_and_unload()`, saves to a temporary directory, reloads with `from_pretrained`, and runs the same
inputs again. This loads the whole model (it is the path tieaudit otherwise avoids), so it is opt-in.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tieaudit.errors import InputError
from tieaudit.ties.compare import PROBE_SEED
from tieaudit.ties.declared import quiet_libraries


@dataclass(frozen=True)
class Measured:
    """Logits of the unmerged PeftModel versus the merged, saved and reloaded model."""

    max_abs_logit_diff: float
    top1_agreement: float
    logit_scale: float  # max |logit| of the PeftModel
    config_tied_after_merge: bool | None


def measure_adapter_merge(base: Path, adapter: Path, architecture: str, *, tokens: int = 16) -> Measured:
    """Run the real merge -> save -> reload and compare logits with the unmerged adapter, in the dtype the
    config names (as the user would load it), on the CPU."""

    import torch

    with quiet_libraries():
        import transformers
        from peft import PeftModel

        cls = getattr(transformers, architecture, None)
        if cls is None:
            raise InputError(f"--deep: transformers has no class {architecture}")
        model = cls.from_pretrained(str(base), dtype="auto")  # as the user loads it (the config dtype)
        model.eval()
        vocab = int(model.get_input_embeddings().weight.shape[0])
        gen = torch.Generator().manual_seed(PROBE_SEED)
        ids = torch.randint(0, vocab, (2, tokens), generator=gen)
        peft_model = PeftModel.from_pretrained(model, str(adapter))
        peft_model.eval()
        with torch.no_grad():
            before = peft_model(input_ids=ids).logits.float()
        merged = peft_model.merge_and_unload()
        with tempfile.TemporaryDirectory(prefix="tieaudit-deep-") as tmp:
            merged.save_pretrained(tmp)
            tied = json.loads((Path(tmp) / "config.json").read_text()).get("tie_word_embeddings")
            reloaded = cls.from_pretrained(tmp, dtype="auto")
            reloaded.eval()
            with torch.no_grad():
                after = reloaded(input_ids=ids).logits.float()
    diff = float((before - after).abs().max())
    top1 = float((before.argmax(-1) == after.argmax(-1)).float().mean())
    return Measured(diff, top1, float(before.abs().max()), tied if isinstance(tied, bool) else None)
