"""What every checkpoint format shares: the tensor names of each naming scheme, and filling a model from them.

A format reader lists the tensors of its files as :class:`StoredTensor` (name, file,
stored shape, a reader) and derives a :class:`~baatt.nn.config.ModelConfig`;
:func:`assemble` then checks names and shapes against the model that config builds
and copies the tensors in. Linear weights are stored ``[out, in]`` in every format
(PyTorch's layout; GGUF's ``ne`` order reversed, as ``gguf.GGUFReader`` gives it)
and become ``nnx.Linear`` kernels ``[in, out]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from baatt.nn.config import ModelConfig
from baatt.nn.model import DiffusionLM

# A parameter of DiffusionLM, as its path in ``nnx.to_pure_dict(nnx.state(model))``.
ParamPath = tuple[str | int, ...]

# The parameters of one transformer block, in the order a checkpoint usually lists them.
BLOCK_PARAMS: tuple[ParamPath, ...] = (
    ("attn_norm", "scale"),
    ("attn", "q_proj", "kernel"),
    ("attn", "k_proj", "kernel"),
    ("attn", "v_proj", "kernel"),
    ("attn", "o_proj", "kernel"),
    ("mlp_norm", "scale"),
    ("mlp", "gate", "kernel"),
    ("mlp", "up", "kernel"),
    ("mlp", "down", "kernel"),
)


@dataclasses.dataclass(frozen=True)
class Naming:
    """How a checkpoint names the model's tensors.

    embed / final_norm / head: the token embedding, the last norm and the untied output head.
    block_prefix: the prefix of block ``i``'s tensors, with ``{i}`` for the block index.
    block: the name after the prefix of each of ``BLOCK_PARAMS`` (same order).
    """

    embed: str
    final_norm: str
    head: str
    block_prefix: str
    block: tuple[str, ...]

    def __post_init__(self):
        if len(self.block) != len(BLOCK_PARAMS):
            raise ValueError(f"Naming.block must name each of the {len(BLOCK_PARAMS)} block parameters {BLOCK_PARAMS}")

    def tensor_names(self, cfg: ModelConfig) -> dict[ParamPath, str]:
        """Parameter path -> checkpoint tensor name, for every parameter of a model of ``cfg``."""
        names: dict[ParamPath, str] = {("embed", "embedding"): self.embed, ("final_norm", "scale"): self.final_norm}
        if not cfg.tie_embeddings:
            names[("head", "kernel")] = self.head
        for i in range(cfg.num_layers):
            prefix = self.block_prefix.format(i=i)
            for path, suffix in zip(BLOCK_PARAMS, self.block):
                names[("blocks", i) + path] = prefix + suffix
        return names


# GGUF (llama.cpp's names for the Llama architecture).
GGUF_LLAMA = Naming(
    embed="token_embd.weight", final_norm="output_norm.weight", head="output.weight", block_prefix="blk.{i}.",
    block=("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
           "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"),
)

# Hugging Face transformers' LlamaForCausalLM.
HF_LLAMA = Naming(
    embed="model.embed_tokens.weight", final_norm="model.norm.weight", head="lm_head.weight",
    block_prefix="model.layers.{i}.",
    block=("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
           "mlp.down_proj.weight"),
)

# LLaDA (LLaDAModelLM, OLMo-style names); ff_proj is the SwiGLU gate, up_proj the linear branch.
HF_LLADA = Naming(
    embed="model.transformer.wte.weight", final_norm="model.transformer.ln_f.weight",
    head="model.transformer.ff_out.weight", block_prefix="model.transformer.blocks.{i}.",
    block=("attn_norm.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "attn_out.weight", "ff_norm.weight",
           "ff_proj.weight", "up_proj.weight", "ff_out.weight"),
)


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """A tensor of a checkpoint: its name, the file holding it, its stored shape and a reader (float32 array)."""

    name: str
    file: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


def _flatten(tree, prefix: ParamPath = ()) -> dict[ParamPath, object]:
    if isinstance(tree, Mapping):
        out = {}
        for key, sub in tree.items():
            out.update(_flatten(sub, prefix + (key,)))
        return out
    return {prefix: tree}


def _set(tree, path: ParamPath, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def assemble(cfg: ModelConfig, naming: Naming, tensors: Mapping[str, StoredTensor], *, source: str,
             ignored: Iterable[str] = (), progress: bool = True) -> DiffusionLM:
    """A DiffusionLM of ``cfg`` holding the checkpoint's tensors.

    source: the checkpoint (path), for messages. ignored: tensor names that may be present and
    are not used (e.g. a copy of the tied embedding). Raises ValueError naming the tensor and
    its file when a tensor is missing, has the wrong shape, or has no place in the model.
    """
    wanted = naming.tensor_names(cfg)
    unexpected = sorted(set(tensors) - set(wanted.values()) - set(ignored))
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise ValueError(
            f"{source}: tensor(s) {shown} have no place in a model of this configuration "
            f"({cfg.num_layers} layers, tie_embeddings={cfg.tie_embeddings})"
        )
    abstract = nnx.eval_shape(lambda: DiffusionLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    params = nnx.to_pure_dict(state)
    shapes = {path: leaf.shape for path, leaf in _flatten(params).items()}
    if set(shapes) != set(wanted):  # the naming tables above must cover DiffusionLM exactly
        raise RuntimeError(f"checkpoint naming out of date with DiffusionLM: {sorted(set(shapes) ^ set(wanted), key=str)}")
    dtype = cfg.weight_dtype
    for path, name in tqdm(wanted.items(), desc=f"loading {source}", unit="tensor", disable=None if progress else True):
        stored = tensors.get(name)
        if stored is None:
            raise ValueError(f"{source}: tensor {name!r} is missing (needed for parameter {'.'.join(map(str, path))})")
        is_kernel = path[-1] == "kernel"
        want = tuple(reversed(shapes[path])) if is_kernel else tuple(shapes[path])
        if tuple(stored.shape) != want:
            raise ValueError(
                f"{source}: tensor {name!r} in {stored.file} has shape {tuple(stored.shape)}; "
                f"the model configuration needs {want}"
            )
        array = np.asarray(stored.read(), np.float32)
        _set(params, path, jnp.asarray(array.T if is_kernel else array, dtype))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
