"""The response-only loss. Gemma's vocabulary is 262k, so projecting every position to logits is most of the cost.
The loss runs the decoder body, gathers the final hidden states at positions whose next-token label is not -100, and
multiplies only those by the output weight (fp32 cross-entropy). With a frozen output weight this is one fused,
token-chunked function that computes the loss and the hidden-state gradient in the same pass (the [N, vocab] logits
never outlive one chunk); with a trainable head it falls back to plain autograd."""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------------------
# response-only loss


class _FusedResponseCE(torch.autograd.Function):
    """Summed cross-entropy of ``h @ W.T (+ b)`` against targets for a frozen W, token-chunked. The hidden-state
    gradient is computed in the forward pass, chunk by chunk, so the [N, vocab] logits never outlive a chunk and
    are never recomputed. Optional tanh soft-capping (Gemma)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, softcap, chunk):
        need = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if need else None
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            rows = torch.arange(hc.shape[0], device=h.device)
            z = torch.nn.functional.linear(hc.to(weight.dtype), weight, bias)  # logits in the weight dtype, like the model
            t = None
            if softcap:
                t = torch.tanh(z.float() / softcap)
                z = t * softcap
            # one fused fp32 softmax pass; logsumexp = z_max - log p_max (p_max >= 1/vocab: no underflow)
            zmax, imax = z.max(dim=-1)
            zt = z[rows, tc].float()
            p = torch.softmax(z, dim=-1, dtype=torch.float32)
            del z  # at most two [chunk, vocab] buffers alive at once
            total += (zmax.float() - torch.log(p[rows, imax]) - zt).sum()
            if need:
                p[rows, tc] -= 1.0  # d loss / d z = softmax - onehot
                if t is not None:
                    p.mul_(1.0 - t * t)
                grad[s : s + chunk] = (p.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad if need else None)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype) if grad is not None else None), None, None, None, None, None


def response_loss_sum(parts, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 128, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 cross-entropy, number of target tokens) over the positions whose next-token label is not
    -100. ``hidden``: (B, T, d) final-normed hidden states; ``parts``: :class:`engine.ModelParts`."""
    h = hidden[:, :-1]
    tgt = labels[:, 1:].to(h.device)
    mask = tgt != -100
    h = h[mask]
    tgt = tgt[mask]
    n = mask.sum()
    head = parts.head
    plain = type(head) is torch.nn.Linear or not hasattr(head, "base_layer")
    w = head.weight if plain else None
    if fused and plain and not w.requires_grad and (head.bias is None or not head.bias.requires_grad):
        return _FusedResponseCE.apply(h, w, head.bias, tgt, parts.softcap, chunk), n
    # trainable or adapted head: plain autograd over the selected positions
    logits = (torch.nn.functional.linear(h.to(w.dtype), w, head.bias) if plain else head(h.to(head.weight.dtype))).float()
    if parts.softcap:
        logits = torch.tanh(logits / parts.softcap) * parts.softcap
    return torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"), n


@dataclass
class ResponseLoss:
    loss_sum: torch.Tensor
    n_tokens: torch.Tensor

    # DDP and the Trainer look into outputs like into a mapping
    def keys(self):
        return ["loss_sum", "n_tokens"]

    def __getitem__(self, k):
        return getattr(self, k)


def install_response_loss(model, chunk: int = 128):
    """Let ``model(..., qt_response_loss=True)`` return a :class:`ResponseLoss` computed from the decoder body and
    the response positions only (any other call is the model's own forward). Installed on the base CausalLM, so
    it works through peft and DDP wrappers. Returns a function that removes it."""
    from qtalign.engine.forward import ModelParts

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = base.forward
    had_attr = "forward" in vars(base)

    def forward(self, *args, qt_response_loss: bool = False, **kw):
        if not qt_response_loss:
            return original(*args, **kw)
        parts = ModelParts.of(self)
        out = parts.decoder(input_ids=kw["input_ids"], attention_mask=kw.get("attention_mask"), use_cache=False)
        loss_sum, n = response_loss_sum(parts, out.last_hidden_state, kw["labels"], chunk)
        return ResponseLoss(loss_sum, n)

    base.forward = types.MethodType(forward, base)

    def remove():
        if had_attr:
            base.forward = original
        else:
            del base.forward

    return remove


