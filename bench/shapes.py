"""Parameter shapes of real models, written out by hand (no downloads, no model code).

Each set is the list of trainable parameter shapes of the model, in module order, as the optimizer sees
them (tied weights once, buffers such as BatchNorm running stats not at all):

- ``gpt2``: GPT-2 124M (HF ``gpt2``: vocab 50257, 1024 positions, d=768, 12 layers, Conv1D weights stored
  as (in, out), lm_head tied to wte). 124,439,808 params in 148 tensors.
- ``tinyllama``: TinyLlama-1.1B (vocab 32000, hidden 2048, MLP 5632, 22 layers, 32 query heads and 4 KV heads
  of 64, RMSNorm weights, untied lm_head). 1,100,048,384 params in 201 tensors.
- ``resnet50``: torchvision ResNet-50 (4-D conv weights, BatchNorm weight and bias, fc). 25,557,032 params in
  161 tensors: many small tensors, the launch-bound case.

``shape_set(name, scale)`` divides every width (hidden sizes, vocab, channels) by ``scale`` and rounds,
keeping the layer count, kernel sizes and the number of tensors, so a CPU can run the same structure in
seconds. Scaled widths are not rounded to nice numbers on purpose: odd sizes are what the kernels must handle.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

Shape = Tuple[int, ...]


def _w(n: int, scale: float) -> int:
    """A width divided by scale, at least 1."""
    return max(1, int(round(n / scale)))


def gpt2_124m(scale: float = 1.0) -> List[Shape]:
    d, vocab, ctx, layers = _w(768, scale), _w(50257, scale), _w(1024, scale), 12
    shapes: List[Shape] = [(vocab, d), (ctx, d)]  # wte (tied with lm_head), wpe
    for _ in range(layers):
        shapes += [(d,), (d,),                     # ln_1
                   (d, 3 * d), (3 * d,),           # attn.c_attn (Conv1D: in x out)
                   (d, d), (d,),                   # attn.c_proj
                   (d,), (d,),                     # ln_2
                   (d, 4 * d), (4 * d,),           # mlp.c_fc
                   (4 * d, d), (d,)]               # mlp.c_proj
    shapes += [(d,), (d,)]                         # ln_f
    return shapes


def tinyllama_1_1b(scale: float = 1.0) -> List[Shape]:
    d, ff, vocab, layers = _w(2048, scale), _w(5632, scale), _w(32000, scale), 22
    kv = _w(4 * 64, scale)  # 4 KV heads of 64 (grouped-query attention)
    shapes: List[Shape] = [(vocab, d)]             # embed_tokens
    for _ in range(layers):
        shapes += [(d, d), (kv, d), (kv, d), (d, d),  # q, k, v, o projections (nn.Linear: out x in)
                   (ff, d), (ff, d), (d, ff),          # gate, up, down
                   (d,), (d,)]                         # input and post-attention RMSNorm
    shapes += [(d,), (vocab, d)]                   # final norm, lm_head (untied)
    return shapes


def resnet50(scale: float = 1.0) -> List[Shape]:
    def c(n: int) -> int:
        return _w(n, scale)

    shapes: List[Shape] = [(c(64), 3, 7, 7), (c(64),), (c(64),)]  # conv1, bn1
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(c(planes), c(inplanes), 1, 1), (c(planes),), (c(planes),),
                       (c(planes), c(planes), 3, 3), (c(planes),), (c(planes),),
                       (c(planes * 4), c(planes), 1, 1), (c(planes * 4),), (c(planes * 4),)]
            if b == 0:  # downsample projection
                shapes += [(c(planes * 4), c(inplanes), 1, 1), (c(planes * 4),), (c(planes * 4),)]
            inplanes = planes * 4
    shapes += [(_w(1000, scale), c(2048)), (_w(1000, scale),)]  # fc
    return shapes


SETS: Dict[str, Callable[[float], List[Shape]]] = {
    "gpt2": gpt2_124m,
    "tinyllama": tinyllama_1_1b,
    "resnet50": resnet50,
}

FULL_NAMES = {"gpt2": "GPT-2 124M", "tinyllama": "TinyLlama-1.1B", "resnet50": "ResNet-50"}


def shape_set(name: str, scale: float = 1.0) -> List[Shape]:
    """The shapes of set `name` ("gpt2", "tinyllama", "resnet50") with widths divided by `scale`."""
    if name not in SETS:
        raise ValueError(f"unknown shape set {name!r}; expected one of {sorted(SETS)}")
    if not scale >= 1:
        raise ValueError(f"scale must be >= 1 (it divides widths), got {scale!r}")
    return SETS[name](scale)


def numel(shapes: List[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


def describe(name: str, scale: float) -> str:
    """E.g. 'GPT-2 124M /8: 2.07M params, 148 tensors'."""
    shapes = shape_set(name, scale)
    tag = FULL_NAMES[name] + ("" if scale == 1 else f" /{scale:g}")
    return f"{tag}: {numel(shapes) / 1e6:.2f}M params, {len(shapes)} tensors"
