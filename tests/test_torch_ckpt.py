"""Training checkpoints of nanoGPT and llama2.c (tieaudit/formats/torch_ckpt.py, rules TIE211-TIE212).

The models below reproduce what each project's model.py does with the pair (the module names, and the one line that
ties them), and the checkpoint dict its train.py saves; `torch.load` and `load_state_dict` are the real ones, and
show what a diverged or incomplete checkpoint does on load.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tieaudit import audit

VOCAB, DIM = 64, 16


class NanoGPT(nn.Module):
    """nanoGPT's GPT, as far as the tie goes (model.py: `self.transformer.wte.weight = self.lm_head.weight`)."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(VOCAB, DIM), "wpe": nn.Embedding(32, DIM), "ln_f": nn.LayerNorm(DIM)}
        )
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight


class Llama2c(nn.Module):
    """llama2.c's Transformer, as far as the tie goes (model.py: `self.tok_embeddings.weight = self.output.weight`)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.tok_embeddings.weight = self.output.weight


PROJECTS = {
    "nanogpt": (
        NanoGPT,
        {"n_layer": 1, "n_head": 2, "n_embd": DIM, "block_size": 32, "bias": True, "vocab_size": VOCAB, "dropout": 0.0},
        "transformer.wte.weight",
        "lm_head.weight",
    ),
    "llama2c": (
        Llama2c,
        {"dim": DIM, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "vocab_size": VOCAB, "multiple_of": 32,
         "max_seq_len": 32, "dropout": 0.0},
        "tok_embeddings.weight",
        "output.weight",
    ),
}  # fmt: skip


def save(model: nn.Module, args: dict, path: Path, state: dict | None = None) -> Path:
    """What train.py saves (both projects): model, optimizer, model_args, iter_num, best_val_loss, config."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpoint = {
        "model": model.state_dict() if state is None else state,
        "optimizer": optimizer.state_dict(),
        "model_args": args,
        "iter_num": 10,
        "best_val_loss": torch.tensor(2.5),
        "config": {"dataset": "shakespeare_char", "learning_rate": 1e-3},
    }
    torch.save(checkpoint, path)
    return path


def codes(path: Path) -> list[str]:
    return [f.code for f in audit(path).findings]


@pytest.mark.parametrize("project", sorted(PROJECTS))
def test_a_tied_checkpoint_is_clean_and_compiled_keys_are_read(project: str, tmp_path: Path) -> None:
    cls, args, _, _ = PROJECTS[project]
    torch.manual_seed(0)
    model = cls()
    report = audit(save(model, args, tmp_path / "ckpt.pt"))
    assert [f.code for f in report.findings] == []
    [group] = report.groups
    assert group.status.value == "tied" and "shared-storage" in group.observed
    assert report.target.architecture == ("nanoGPT" if project == "nanogpt" else "llama2.c")
    compiled = torch.compile(model)  # the wrapper a compiled run saves: every key gets "_orig_mod."
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    report = audit(save(model, args, tmp_path / "compiled.pt", state))
    assert [f.code for f in report.findings] == [] and "torch.compile-prefix" in report.groups[0].observed


@pytest.mark.parametrize("project", sorted(PROJECTS))
def test_a_diverged_checkpoint_loses_a_trained_matrix(project: str, tmp_path: Path) -> None:
    cls, args, emb, head = PROJECTS[project]
    torch.manual_seed(0)
    model = cls()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # clone: two storages
    state[emb] = torch.randn(VOCAB, DIM)  # the embedding trained apart from the head
    path = save(model, args, tmp_path / "ckpt.pt", state)
    # what the project's loader does: both keys land in the one tied Parameter, the later one wins
    fresh = cls()
    fresh.load_state_dict(torch.load(path, weights_only=True)["model"])
    later = [k for k in state if k in (emb, head)][-1]
    assert torch.equal(fresh.state_dict()[emb], state[later]) and not torch.equal(state[emb], state[head])
    report = audit(path)
    assert [f.code for f in report.findings] == ["TIE211"]
    finding = report.findings[0]
    assert finding.evidence["wins"] == later and finding.evidence["max_abs_diff"] > 0
    assert report.groups[0].status.value == "diverged"


@pytest.mark.parametrize("project", sorted(PROJECTS))
def test_a_checkpoint_without_one_key_does_not_load(project: str, tmp_path: Path) -> None:
    cls, args, _, head = PROJECTS[project]
    model = cls()
    state = dict(model.state_dict())
    del state[head]
    path = save(model, args, tmp_path / "ckpt.pt", state)
    with pytest.raises(RuntimeError, match="Missing key"):
        cls().load_state_dict(torch.load(path, weights_only=True)["model"])
    assert codes(path) == ["TIE212"]


def _cli(path: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "tieaudit"
    return subprocess.run([str(exe), "check", str(path), "-f", "json"], capture_output=True, text=True, timeout=120)


def test_other_torch_files(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "plain.pt")  # a bare state dict: no project to read it by
    proc = _cli(tmp_path / "plain.pt")
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1

    class Payload:
        def __reduce__(self) -> tuple:
            return (print, ("code ran",))

    torch.save({"model": {}, "model_args": {}, "x": Payload()}, tmp_path / "evil.pt", pickle_module=pickle)
    proc = _cli(tmp_path / "evil.pt")
    assert proc.returncode == 2 and "code ran" not in proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    good = save(NanoGPT(), PROJECTS["nanogpt"][1], tmp_path / "ckpt.pt")
    proc = _cli(good)
    assert proc.returncode == 0 and json.loads(proc.stdout)["target"]["layout"] == "torch-ckpt"


def test_a_run_directory_stands_for_its_model_files(tmp_path: Path) -> None:
    """llama2.c's train.py writes ckpt.pt and model.bin into out/: `check out/` audits both (a batch, as a trainer's
    directory of checkpoints is); files are recognised by their content, not their names."""
    from tests.test_llama2c import export
    from tests.test_llama2c import model as llama2c_weights

    out = tmp_path / "out"
    out.mkdir()
    cls, args, _, _ = PROJECTS["llama2c"]
    save(cls(), args, out / "ckpt.pt")
    export(llama2c_weights(shared=True), out / "model.bin", 0)
    (out / "notes.txt").write_text("not a model")
    exe = Path(sys.executable).parent / "tieaudit"
    proc = subprocess.run([str(exe), "check", str(out), "-f", "json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    layouts = sorted(item["target"]["layout"] for item in doc["reports"])
    assert layouts == ["llama2.c v0", "torch-ckpt"]
    (out / "model.bin").write_bytes((out / "model.bin").read_bytes()[:-4])  # no longer a llama2.c file: left out
    proc = subprocess.run([str(exe), "check", str(out), "-f", "json"], capture_output=True, text=True, timeout=120)
    assert [i["target"]["layout"] for i in json.loads(proc.stdout)["reports"]] == ["torch-ckpt"]
