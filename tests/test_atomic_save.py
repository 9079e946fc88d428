"""Saving over an existing checkpoint is atomic as a whole: a save killed (SIGKILL) at any moment
leaves either the old or the new checkpoint, complete and loadable, for save_quantized and for
transformers' save_pretrained of a loaded PVQ model, with and without RENAME_EXCHANGE."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import pvq_cuda  # noqa: E402
from pvq_cuda.format import atomic  # noqa: E402
from tiny_llama import VOCAB, tiny_model, tiny_tokenizer  # noqa: E402

TESTS = Path(__file__).resolve().parent

# The child loads two checkpoints and saves them in turn over the target until it is killed.
CHILD = r"""
import sys
import pvq_cuda
from pvq_cuda.format import atomic
how, target, a, b, exchange = sys.argv[1:6]
if exchange == "0":
    atomic._exchange = lambda x, y: False  # the two-rename fallback
models = [pvq_cuda.load_quantized(a), pvq_cuda.load_quantized(b)]
print("ready", flush=True)
i = 0
while True:
    m = models[i % 2]
    if how == "save_quantized":
        pvq_cuda.save_quantized(m, target)
    else:
        m.save_pretrained(target)
    i += 1
"""


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    paths = []
    for seed in (0, 1):
        model = tiny_model(seed)
        pvq_cuda.quantize_model(model, method="pvq-datafree", progress=False, device="cpu")
        pvq_cuda.save_quantized(model, root / f"m{seed}", tokenizer=tiny_tokenizer())
        paths.append(root / f"m{seed}")
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    logits = [_logits(pvq_cuda.load_quantized(p), tokens) for p in paths]
    assert not torch.equal(logits[0], logits[1])
    return paths, tokens, logits


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("exchange", ["1", "0"], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("how", ["save_quantized", "save_pretrained"])
def test_killed_saves_leave_a_loadable_checkpoint(two_checkpoints, tmp_path, how, exchange):
    from transformers import AutoModelForCausalLM

    (a, b), tokens, logits = two_checkpoints
    target = tmp_path / "ckpt"
    pvq_cuda.save_quantized(pvq_cuda.load_quantized(a), target)
    (target / "notes.txt").write_text("a user's file beside the checkpoint")
    rng = random.Random(f"{how}{exchange}")
    for attempt in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, how, str(target), str(a), str(b), exchange],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(TESTS), HF_HUB_OFFLINE="1"))
        try:
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
            time.sleep(rng.uniform(0.2, 1.5))  # tens of saves a second: the kill lands inside one
            assert child.poll() is None, child.stderr.read()
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        loaded = pvq_cuda.load_quantized(target)  # puts an interrupted two-rename swap back first
        got = _logits(loaded, tokens)
        assert torch.equal(got, logits[0]) or torch.equal(got, logits[1]), f"attempt {attempt}"
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target), tokens), got)
        assert (target / "notes.txt").read_text() == "a user's file beside the checkpoint"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    pvq_cuda.save_quantized(pvq_cuda.load_quantized(b), target)  # the next save cleans up
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], leftovers


def test_replace_directory_keeps_the_old_version_on_error(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.replace_directory(target) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("boom")
    assert (target / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_replace_directory_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        with atomic.replace_directory(tmp_path / "f"):
            pass
