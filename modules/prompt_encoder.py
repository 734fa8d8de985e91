"""Prompts → the pipeline's text conditioning, the way A1111 encodes them: emphasis weights, prompts longer than 75
tokens in 75-token chunks (a chunk breaks after a comma when one is close, `BREAK` forces a break), each chunk encoded
on its own and the chunks concatenated, CLIP skip for SD1/SD2.

For a plain prompt of up to 75 tokens the result is bit-for-bit what diffusers' own `encode_prompt` gives.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modules import prompt_parser, shared

CHUNK = 75
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def tokenize_line(tokenizer, text: str) -> list[_Chunk]:
    """One prompt → chunks of exactly 77 ids (BOS, 75 tokens, EOS) with one weight each."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[_Chunk] = []
    chunk = _Chunk()
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        filler = CHUNK - len(chunk.tokens)
        # EOS closes the text, then the tokenizer's pad token (EOS for CLIP-L, "!" for OpenCLIP), as in diffusers
        tokens = [bos] + chunk.tokens + [eos] + [pad] * filler
        chunks.append(_Chunk(tokens, [1.0] + chunk.weights + [1.0] * (filler + 1)))
        chunk = _Chunk()
        last_comma = -1

    parsed = prompt_parser.parse_prompt_attention(text)
    for fragment, weight in parsed:
        if fragment == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in tokenizer(fragment, add_special_tokens=False, truncation=False, verbose=False).input_ids:
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                moved = _Chunk(chunk.tokens[last_comma + 1:], chunk.weights[last_comma + 1:])
                chunk = _Chunk(chunk.tokens[:last_comma + 1], chunk.weights[:last_comma + 1])
                next_chunk()
                chunk = moved
            if len(chunk.tokens) == CHUNK:
                next_chunk()
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        next_chunk()
    return chunks


def _encoders(sd_model) -> list[tuple[object, torch.nn.Module]]:
    pairs = [(sd_model.tokenizer, sd_model.text_encoder)]
    if getattr(sd_model, "text_encoder_2", None) is not None:
        pairs.append((sd_model.tokenizer_2, sd_model.text_encoder_2))
    return pairs


def _clip_skip(sd_model) -> int:
    try:
        return max(1, int(shared.opts.data.get("CLIP_stop_at_last_layers", 1)))
    except (TypeError, ValueError):
        return 1


def _encode_chunk(sd_model, encoder: torch.nn.Module, ids: torch.Tensor, second: bool):
    """(hidden states, pooled or None) for one batch of 77-token chunks."""
    out = encoder(ids, output_hidden_states=True)
    if sd_model.is_sdxl:
        pooled = out[0] if second else None  # CLIPTextModelWithProjection: text_embeds
        return out.hidden_states[-2], pooled
    skip = _clip_skip(sd_model)
    if skip <= 1:
        return out[0], None
    text_model = getattr(encoder, "text_model", encoder)
    return text_model.final_layer_norm(out.hidden_states[-skip]), None


def _weighted(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis: scale each token's vector, then restore the chunk's mean."""
    if bool((weights == 1).all()):
        return z
    original_mean = z.mean()
    z = z * weights.reshape(weights.shape + (1,)).to(z.dtype)
    return z * (original_mean / z.mean())


def encode_batch(sd_model, prompts: list[str], device) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Per prompt: (chunks, 77, width) conditioning; and the pooled embedding (SDXL) of each prompt's first chunk."""
    per_prompt: list[list[torch.Tensor]] = [[] for _ in prompts]
    pooled = None
    for index, (tokenizer, encoder) in enumerate(_encoders(sd_model)):
        lines = [tokenize_line(tokenizer, text) for text in prompts]
        for i, chunks in enumerate(lines):
            ids = torch.tensor([c.tokens for c in chunks], device=device)
            weights = torch.tensor([c.weights for c in chunks], device=device)
            z, p = _encode_chunk(sd_model, encoder, ids, second=index == 1)
            z = torch.stack([_weighted(z[k], weights[k]) for k in range(z.shape[0])])
            per_prompt[i].append(z)
            if p is not None:
                pooled = p[0:1] if pooled is None else torch.cat([pooled, p[0:1]])
    return [torch.cat(parts, dim=-1) for parts in per_prompt], pooled


def _flatten(chunks: torch.Tensor, count: int, empty: torch.Tensor | None) -> torch.Tensor:
    """(chunks, 77, C) → (1, 77·count, C), padded with the empty prompt's chunk (A1111 pads uncond the same way)."""
    if chunks.shape[0] < count:
        chunks = torch.cat([chunks, empty.expand(count - chunks.shape[0], -1, -1)])
    return chunks.reshape(1, -1, chunks.shape[-1])


def encode(sd_model, prompts: list[str], negative_prompts: list[str]) -> dict[str, torch.Tensor]:
    """The pipeline's prompt_embeds / negative_prompt_embeds (and pooled ones for SDXL) for a batch."""
    device = sd_model.unet.device
    cond, pooled = encode_batch(sd_model, list(prompts), device)
    uncond, negative_pooled = encode_batch(sd_model, list(negative_prompts), device)
    count = max(z.shape[0] for z in cond + uncond)
    # the empty prompt's chunk pads shorter prompts; encoded only when some prompt needs it
    empty = encode_batch(sd_model, [""], device)[0][0] if any(z.shape[0] < count for z in cond + uncond) else None
    res = {
        "prompt_embeds": torch.cat([_flatten(z, count, empty) for z in cond]),
        "negative_prompt_embeds": torch.cat([_flatten(z, count, empty) for z in uncond]),
    }
    if pooled is not None:
        res["pooled_prompt_embeds"] = pooled
        res["negative_pooled_prompt_embeds"] = negative_pooled
    return res
