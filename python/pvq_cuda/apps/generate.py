"""`pvq-cuda generate`: text from a model (a PVQ directory, an HF directory, a GGUF, or the default),
streamed as it is generated, with the decoding speed at the end."""

from __future__ import annotations

import sys
import time

import torch

from .loading import load_model


def prompt_ids(tokenizer, prompt: str, chat: bool | None = None) -> torch.Tensor:
    """The prompt's token ids [1, n]: through the tokenizer's chat template when it has one (unless
    ``chat`` is False), else the plain text."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise ValueError("--prompt: the prompt has no tokens")
    return ids


class _Timed:
    """A streamer that forwards to ``inner`` and notes when the first new token arrives: generate
    puts the prompt first, then each new token."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.first = inner, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, *, chat: bool | None = None,
             stream: bool = True, do_sample: bool = False, temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Generate from ``prompt``; with ``stream`` the text goes to stdout as it comes. Returns the new
    token ids and ``{"new_tokens", "seconds", "tokens_per_second", "prefill_seconds"}``."""
    from transformers import TextStreamer

    ids = prompt_ids(tokenizer, prompt, chat).to(model.device)
    timer = _Timed(TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, streamer=timer,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if do_sample:
        kwargs["temperature"] = temperature
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    t1 = time.perf_counter()
    new = out[0, ids.shape[-1]:]
    first = timer.first if timer.first is not None else t1
    decoded = max(new.numel() - 1, 0)  # tokens after the first, which the prefill produced
    stats = {"new_tokens": int(new.numel()), "seconds": t1 - t0, "prefill_seconds": first - t0,
             "tokens_per_second": decoded / (t1 - first) if decoded and t1 > first else 0.0}
    return new, stats


def cmd_generate(args) -> int:
    from .jobs import _device

    device = _device(args)
    lm = load_model(args.model, device=device, quiet=True)
    if lm.tokenizer is None:
        raise ValueError(f"--model {args.model}: no tokenizer was saved with this model")
    _, stats = generate(lm.model, lm.tokenizer, args.prompt, args.max_new_tokens, chat=args.chat,
                        do_sample=args.temperature > 0, temperature=args.temperature or 1.0)
    print(f"\n{stats['new_tokens']} tokens, {stats['tokens_per_second']:.2f} tokens/s decoding "
          f"(prefill {stats['prefill_seconds']:.2f} s) on {device}", file=sys.stderr)
    return 0
