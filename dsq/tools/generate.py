"""Sample text from a dsq checkpoint (``dsq generate``).

The model is the checkpoint's, loaded as ``dsq eval`` loads it (any tensor-parallel size
merged, weights strict, the run's quantization applied), on the GPU when there is one. The
prompt is encoded with dsq's encoder and preceded by the end-of-document token ``</s>``: in
training every document follows one, so the prompt starts a document. Each step runs the
model on the last ``model.seq_len`` tokens (no KV cache: the quantized forward, whose
per-tensor scales span the whole input, stays the one that was trained) and draws the next
token from ``softmax(logits / temperature)`` over the tokenizer's pieces (embedding rows past
the tokenizer's vocabulary are padding and never drawn), restricted to the ``top_k`` most
likely when given; ``temperature=0`` is greedy. Draws come from a generator seeded with
``seed``, so the same seed, checkpoint and device give the same text. Generation stops after
``max_new_tokens`` or at ``</s>``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch


class GenerateError(ValueError):
    """A generation option that cannot be honoured; the message names it."""


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerateError(f"--device {device}: no CUDA device is available here")
    return device


@torch.no_grad()
def sample(model, prompt_ids, seq_len: int, vocab: int, eos_id: int, max_new_tokens: int = 50,
           temperature: float = 1.0, top_k: Optional[int] = None, seed: int = 0,
           device: str = "cpu") -> list:
    """New token ids continuing ``prompt_ids`` (see the module docstring)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    new = []
    for _ in range(max_new_tokens):
        ctx = ids[-seq_len:].unsqueeze(0)
        pos = torch.arange(ctx.shape[1], device=device).unsqueeze(0)
        logits = model(ctx, pos, None)[0, -1, :vocab].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, vocab)).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt == eos_id:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt], device=device)])
    return new


def generate(path: str, prompt: str, max_new_tokens: int = 50, temperature: float = 1.0,
             top_k: Optional[int] = None, seed: int = 0, device: str = "auto") -> Dict:
    """``{"text": prompt + continuation, "continuation", "ids" (new), "device"}``."""
    from dsq.parallel import shutdown
    from dsq.run.load import load_model, load_tokenizer, pinned
    from dsq.tools.hf_tokenizer import dsq_encoder

    if max_new_tokens < 0:
        raise GenerateError(f"--max-new-tokens {max_new_tokens} must be 0 or more")
    if temperature < 0:
        raise GenerateError(f"--temperature {temperature} must be 0 (greedy) or more")
    if top_k is not None and top_k < 1:
        raise GenerateError(f"--top-k {top_k} must be 1 or more")
    device = pick_device(device)
    with pinned(path) as tag_dir:  # pruning cannot remove it while it is read
        sp = load_tokenizer(tag_dir)
        prompt_ids = dsq_encoder(sp)(prompt)
        try:
            model, cfg, _ = load_model(str(tag_dir), quantize=True, device=device)
            vocab = min(sp.vocab_size(), cfg.model.vocab_size)
            new = sample(model, [sp.eos_id()] + prompt_ids, cfg.model.seq_len, vocab, sp.eos_id(),
                         max_new_tokens, temperature, top_k, seed, device)
        finally:
            shutdown()
        head = sp.decode(prompt_ids)
        full = sp.decode(prompt_ids + new)
        cont = full[len(head):] if full.startswith(head) else sp.decode(new)
        return {"text": prompt + cont, "continuation": cont, "ids": new, "device": device}
