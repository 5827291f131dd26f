"""The error model of the fused LM head's gradients, shared by tests/test_linear_head.py (the launchers)
and tests/test_linear_token_logprobs.py (the public op, every backend).

With z = (X W^T + b) / T, the gradients are GEMMs of dz = dL/dz: grad X = dz W / T, grad W = dz^T X / T,
grad b = sum_n dz_n / T. The tensor-core path rounds dz once to the operand dtype before the two GEMMs
(unit roundoff u), accumulates in fp32 and rounds each result once more, so element by element

    |grad - exact| <= (u + slack) (sum_k |dz_k| |w_k| + |exact|) + slack sum_k p_k |h| |w_k| / T
                      + floor * sum_k |w_k|

where the sums run over the terms that form the element (|dz| taken as its two parts |g| [k == t] and
p |g + h (z - mu)|), slack is the fp32 (fp64) error of the logits, relative to their size: it is the
relative error of p = exp(z - lse) and the absolute error of z - mu (which the entropy's gradient
multiplies by p h, even where g + h (z - mu) cancels), and floor is the absolute rounding of one dz (below). Paths that keep dz in fp32 (the C++ kernels, the
hybrid Triton engine) meet the same bound with room to spare: their only 16-bit rounding is the last one.
"""

from __future__ import annotations

import torch

from cai_kernels.reference import token_logprobs as reference_token_logprobs

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# Triton's interpreter rounds fp32 -> bf16 toward zero (triton 3.9, ``_convert_float``): one unit in the
# last place, not half; the GPU and the C++ kernels round to nearest even.
INTERPRETER_BF16_ROUNDOFF = 2.0**-7
# Absolute rounding of one dz element. Stored: fp16's subnormals (below 6.1e-5) are spaced 2^-24 apart,
# so dz that small rounds with an error up to 2^-25 (probabilities ~ 1/V land there), as in torch's own
# fp16 softmax backward. Computed: p = exp(z - lse) below fp32's (fp64's) smallest normal number may
# be flushed to zero (the GPU's ex2.approx.ftz), an error of up to that number times |g + h (z - mu)| / T.
ABSOLUTE_ROUNDOFF = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25, torch.float32: 2.0**-150,
                     torch.float64: 2.0**-1075}
SMALLEST_NORMAL = {torch.float64: 2.0**-1022}


def unit_roundoff(dtype: torch.dtype, *, interpreted: bool) -> float:
    """u of ``dtype``'s roundings; ``interpreted``: the Triton kernels ran through the interpreter."""
    if interpreted and dtype == torch.bfloat16:
        return INTERPRETER_BF16_ROUNDOFF
    return UNIT_ROUNDOFF[dtype]


def exact(hidden, weight, bias, targets, upstream, *, temperature=1.0, ignore_index=None):
    """float64 reference on the very values the kernels saw: logp, entropy, lse, the gradients of
    sum(a * log p + c * entropy) (autograd; upstream = (a, c), c may be empty) and, for the error model,
    |dz| split into its two parts: (|g| [k == t] + p |g + h (z - mu)|) / T, the entropy term's sensitivity
    to an absolute error of z - mu: p |h| / T, and the sizes (max |z| + max |lse|, max coefficient)
    that the slack and the floor scale with.

    Returns (logp, entropy, lse, (grad_hidden, grad_weight, grad_bias or None), ((parts, entropy_parts), sizes),
    (hidden, weight) in float64 on the CPU)."""
    leaves = [None if t is None else t.detach().double().cpu().requires_grad_() for t in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(*leaves)
    targets = targets.cpu()
    logp, entropy = reference_token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                                             return_entropy=True)
    grad_logp, grad_ent = (u.double().cpu().reshape(-1) for u in upstream)
    loss = (logp.reshape(-1) * grad_logp).sum()
    if grad_ent.numel():
        loss = loss + (entropy.reshape(-1) * grad_ent).sum()
    grads = list(torch.autograd.grad(loss, [t for t in leaves if t is not None]))
    grads = tuple(grads.pop(0) if leaf is not None else None for leaf in leaves)
    with torch.no_grad():
        z = (logits / temperature).reshape(-1, logits.size(-1))
        p = z.softmax(-1)
        active = (torch.ones(z.size(0), dtype=torch.bool) if ignore_index is None
                  else targets.reshape(-1) != ignore_index)
        g = grad_logp * active
        h = grad_ent * active if grad_ent.numel() else torch.zeros_like(g)
        mu = (p * z.masked_fill(p == 0, 0.0)).sum(-1, keepdim=True)
        coef = (g[:, None] + h[:, None] * (z - mu).masked_fill(p == 0, 0.0)).abs()
        is_target = torch.nn.functional.one_hot(targets.reshape(-1).clamp(min=0), z.size(-1)).bool()
        parts = ((g.abs()[:, None] * is_target + p * coef) * active[:, None]) / temperature
        entropy_parts = p * (h.abs() * active)[:, None] / temperature
        lse = torch.logsumexp(z, -1).masked_fill(~active, 0.0)
        finite = z[torch.isfinite(z)]
        logit_size = (finite.abs().max().item() if finite.numel() else 0.0) + lse.abs().max().item()
        coef_size = (g.abs().max().item() + h.abs().max().item() * 2 * logit_size) / temperature
    return (logp.detach(), entropy.detach(), lse, grads, ((parts, entropy_parts), (logit_size, coef_size)),
            (leaves[0].detach(), leaves[1].detach()))


def assert_within_model(actual, expected, terms_bound, entropy_bound, weights_bound, sizes, dtype, name, *,
                        interpreted):
    """|actual - expected| <= (u + slack) (terms_bound + |expected|) + slack * entropy_bound + floor *
    weights_bound, element by element: terms_bound = sum_k |dz_k| |w_k| over the sum that forms the
    element (|dz| as its two parts), entropy_bound = sum_k p_k |h| |w_k| / T, weights_bound = sum_k |w_k|.
    slack: the fp32 (fp64) error of the logits relative to their size (max |z| + max |lse|); floor:
    the absolute rounding of one dz (see above)."""
    logit_size, coef_size = sizes
    eps = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    slack = 32 * eps * (1 + logit_size)
    floor = ABSOLUTE_ROUNDOFF[dtype] + SMALLEST_NORMAL.get(dtype, 2.0**-126) * coef_size
    bound = (unit_roundoff(dtype, interpreted=interpreted) + slack) * (terms_bound + expected.abs()) \
        + slack * entropy_bound + floor * weights_bound + 1e-300
    error = (actual.detach().double().cpu() - expected).abs()
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    assert worst <= 1.0, f"{name}: error {worst:.2f}x the model's bound (max abs error {error.max().item():.3g})"


def assert_gradients_within_model(grads, ref_grads, dz_parts, sizes, hidden64, weight64, dtype, *, interpreted):
    """(grad_hidden, grad_weight, grad_bias) against their float64 values ``ref_grads`` under the model;
    where a reference is None (no bias) the gradient must be absent (None or empty). dz_parts, sizes:
    as ``exact`` returns them."""
    x2 = hidden64.reshape(-1, hidden64.size(-1))

    def through_the_gemms(parts):  # |.| of dz's contribution to each element of (grad X, grad W, grad b)
        return (parts @ weight64.abs()).reshape(hidden64.shape), parts.t() @ x2.abs(), parts.sum(0)

    bounds, entropy_bounds = (through_the_gemms(parts) for parts in dz_parts)
    weights = (weight64.abs().sum(0).expand(hidden64.shape), x2.abs().sum(0).expand(weight64.shape),
               torch.full((weight64.size(0),), float(x2.size(0)), dtype=torch.float64))
    for name, grad, ref, bound, entropy_bound, weight_sum in zip(("grad_hidden", "grad_weight", "grad_bias"), grads,
                                                                 ref_grads, bounds, entropy_bounds, weights):
        if ref is None:
            assert grad is None or grad.numel() == 0, f"{name}: computed, but not asked for"
            continue
        assert grad.shape == ref.shape, f"{name}: shape {tuple(grad.shape)}, expected {tuple(ref.shape)}"
        assert_within_model(grad, ref, bound, entropy_bound, weight_sum, sizes, dtype, name, interpreted=interpreted)
