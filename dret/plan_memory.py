"""Activation memory of a train step on an accelerator, counted from the model's shapes (`dret.plan --backend`).

A pure model of what the backward pass keeps, per token, in dret's layers (`dret.models.bert`, `dret.models.llama`):
matmuls take compute-dtype inputs and give float32 outputs; the residual stream, norms, softmax and the loss are
float32. On GPU in half precision attention is cuDNN's flash kernel (keeps q, k, v, its output and a float32
logsumexp, never the [T, S] scores); elsewhere (TPU, GPU in float32) it is XLA's, which keeps the float32
probabilities [H, T, S] per text and layer. Without `recompute` every layer's saved tensors live until its backward
pass; with it only each layer's float32 input does, plus one layer's saved tensors, rebuilt during its backward.

Modelled: every tensor listed in `layer_bytes_per_token` (a matmul's input only where its weight or adapter trains,
LoRA's r-wide products and per-adapter dropout), the attention mask, embeddings, pooling, the loss, one layer's
gradient buffers, and the compute-dtype (under stage3: gathered) weight copies the backward multiplies by.
Checked: without recompute, 0.96 of the H200's measured peak on BERT-base (bench/RESULTS_plan.md; with recompute
1.36: an upper bound), and 0.70-0.85 of XLA:CPU's compiled temporaries on a tiny float32 BERT with attention made
negligible (tests/test_plan.py; XLA:CPU keeps more of JAX's residuals, and about twice the model in bf16 and under
LoRA). TPU: dret runs XLA's attention there (no splash kernel yet), so its [H, T, S] probabilities are counted. Not
modelled: what XLA's fusion recomputes or keeps beyond this list, allocator fragmentation and workspaces (cuDNN,
cuBLAS), NV-Embed's latent-attention pooling, tensor parallelism (mesh.tensor > 1).
"""

from __future__ import annotations

import dataclasses

F32 = 4  # bytes of float32: residual stream, norm inputs, softmax, loss
MASK = 1  # bytes of a boolean (dropout keep masks, attention masks)


@dataclasses.dataclass(frozen=True)
class Dims:
    """The shapes a layer's activations depend on."""

    family: str  # "bert" (post-norm LayerNorm, GELU MLP, biases) or "llama" (pre-norm RMSNorm, SwiGLU, GQA)
    layers: int
    hidden: int  # d
    intermediate: int  # f
    heads: int
    kv_heads: int
    head_dim: int
    dropout: float  # hidden dropout after attention and MLP (BERT's hidden_dropout_prob; Llama has none)

    @classmethod
    def of(cls, family: str, cfg) -> "Dims":
        """From a family's validated config (`dret.models.config_of`)."""
        if family == "bert":
            heads = cfg.num_attention_heads
            return cls(family, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, heads, heads,
                       cfg.hidden_size // heads, cfg.hidden_dropout_prob)
        return cls(family, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                   cfg.num_key_value_heads, cfg.head_dim, 0.0)

    def matmul_inputs(self) -> tuple[tuple[int, tuple[str, ...]], ...]:
        """(input width, the matmuls reading that input) of one layer, by the family's LoRA module names."""
        d, f, attn = self.hidden, self.intermediate, self.heads * self.head_dim
        if self.family == "bert":
            return (d, ("query", "key", "value")), (attn, ("attn_out",)), (d, ("mlp_in",)), (f, ("mlp_out",))
        return ((d, ("q_proj", "k_proj", "v_proj")), (attn, ("o_proj",)), (d, ("gate_proj", "up_proj")),
                (f, ("down_proj",)))

    def layer_weights(self) -> int:
        """Matmul weights of one layer."""
        d, f = self.hidden, self.intermediate
        qkvo = d * (2 * self.heads + 2 * self.kv_heads) * self.head_dim
        return qkvo + (2 if self.family == "bert" else 3) * d * f


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What trains: `sft` every weight, `bitfit` biases only, `lora` adapters of rank r on `targets`."""

    kind: str
    lora_rank: int = 0
    lora_dropout: float = 0.0
    targets: tuple[str, ...] = ()


def layer_bytes_per_token(dims: Dims, c: int, tuning: Tuning, *, flash: bool, length: int) -> int:
    """Bytes per token that one layer keeps for its backward pass; `c` is the compute dtype's size, `length` the
    keys per query (only XLA's attention depends on it)."""
    d, f, hd = dims.hidden, dims.intermediate, dims.head_dim
    n, kv = dims.heads, dims.kv_heads
    total = c * (n + 2 * kv) * hd  # q, k, v in the compute dtype: attention's backward reads them
    if flash:
        total += c * n * hd + F32 * n  # cuDNN also keeps its output and the float32 logsumexp per head
    else:
        total += (F32 + (c if c < F32 else 0)) * n * length  # XLA: softmax probabilities, float32 and compute dtype
    for width, names in dims.matmul_inputs():
        adapted = [m for m in names if m in tuning.targets] if tuning.kind == "lora" else []
        keep_input = tuning.kind == "sft" or (adapted and tuning.lora_dropout == 0)
        if keep_input and not (flash and names[0] in ("attn_out", "o_proj")):  # cuDNN keeps the attention output
            total += c * width  # the matmul's input, for its weight's (or the adapters') gradient
        if adapted and tuning.lora_dropout > 0:
            total += len(adapted) * (c + MASK) * width  # each adapter's dropped input and its keep mask
        total += len(adapted) * F32 * tuning.lora_rank  # each adapter's r-wide product x A (float32), for B's gradient
    if dims.family == "bert":
        total += 2 * (F32 * d + 2 * F32)  # both LayerNorms' float32 inputs, mean and 1/std
        total += F32 * f  # the GELU's input (mlp_in's float32 output)
        total += (2 * MASK * d) if dims.dropout > 0 else 0  # keep masks of the attention and MLP dropouts
    else:
        total += 2 * (F32 * d + F32)  # both RMSNorms' float32 inputs and 1/rms
        total += 2 * F32 * f  # SwiGLU's gate and up outputs (float32): the product's and silu's backward
    return total


def text_bytes(dims: Dims, c: int, tuning: Tuning, *, rows: int, length: int, recompute: bool, flash: bool,
               gathered: bool) -> dict[str, int]:
    """Bytes one batch of `rows` texts of `length` tokens keeps across the backward pass, by part; `gathered`:
    stage3, where each layer's weights are all-gathered before use."""
    d, tokens = dims.hidden, rows * length
    layer = layer_bytes_per_token(dims, c, tuning, flash=flash, length=length) * tokens
    kept_layers = 1 if recompute else dims.layers
    parts = {
        # without recompute every layer's saved tensors; with it each layer's float32 input and one layer's rebuilt
        "layers": layer * kept_layers + (F32 * d * tokens * dims.layers if recompute else 0),
        # the attention mask, computed once and shared by the layers: cuDNN takes it as an additive bias [B, 1, T, S]
        # in the compute dtype; XLA as booleans
        "mask": (c if flash else MASK) * rows * length * length,
        # one layer's gradients in flight: the residual stream's (in and out) and the MLP hidden's, float32
        "gradients": F32 * (2 * d + (1 if dims.family == "bert" else 2) * dims.intermediate) * tokens,
        # the weights the backward multiplies by, in the compute dtype (a cast of the float32 masters; under stage3
        # the all-gathered copy): every layer's without recompute, one layer's with it
        "weights": (kept_layers * dims.layer_weights() * c) if (c < F32 or gathered) else 0,
    }
    if dims.family == "bert" and tuning.kind != "lora":  # the embeddings' LayerNorm trains (sft, bitfit)
        # its float32 input, mean and 1/std, and the embedding dropout's keep mask
        parts["embeddings"] = (F32 * d + 2 * F32 + (MASK * d if dims.dropout > 0 else 0)) * tokens
    if dims.family == "llama":
        # the final RMSNorm's float32 input and 1/rms, and RoPE's cos and sin [T, head_dim / 2] (shared by layers)
        parts["embeddings"] = (F32 * d + F32 + 2 * F32 * dims.head_dim // 2) * tokens
    parts["pooling"] = F32 * tokens  # each token's pooling weight, float32
    return parts


def activation_bytes(dims: Dims, c: int, tuning: Tuning, *, queries: tuple[int, int], passages: tuple[int, int],
                     loss_queries: int, loss_passages: int, recompute: bool, flash: bool, gathered: bool) -> int:
    """Bytes of activations one device holds at the start of the backward pass of one micro-batch: its
    `queries` and `passages` as (rows, length), and the loss over `loss_queries` x `loss_passages` scores."""
    kwargs = dict(recompute=recompute, flash=flash, gathered=gathered)
    q = text_bytes(dims, c, tuning, rows=queries[0], length=queries[1], **kwargs)
    p = text_bytes(dims, c, tuning, rows=passages[0], length=passages[1], **kwargs)
    weights = max(q.pop("weights"), p.pop("weights"))  # queries and passages multiply by the same copies
    gradients = max(q.pop("gradients"), p.pop("gradients"))  # one layer's backward runs at a time
    # the loss: scores and log-probabilities [queries, passages] in float32, and the gathered embeddings
    loss = F32 * (2 * loss_queries * loss_passages + (loss_queries + loss_passages) * dims.hidden)
    return sum(q.values()) + sum(p.values()) + weights + gradients + loss
