"""reward_pairwise_loss: every compiled backend against the float64 reference, the last-token
reward head under every padding style and layout; bad input."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import cai_kernels
from cai_kernels.reference import last_token_index, reward_pairwise_loss as reference
from tests._backends import LOW_PRECISION, assert_close, compiled_backends, grad_tolerance
from tests._preference import DEVICE, FP32_TOL, double_leaves, leaves, padded_mask, random_head, random_hidden

BACKENDS = compiled_backends("reward_pairwise_loss", DEVICE)


def check_forward_backward(chosen_hidden, chosen_mask, rejected_hidden, rejected_mask, weight, bias, backend, *,
                           soft_labels=None, margin=None, reward_weight=0.3):
    """Loss, rewards, and the gradients (hidden states, head) of loss + reward_weight * mean(rewards^2) (a
    reward-centering term, so gradients also flow in through the returned rewards), against the reference."""
    ch, rh, w, b = leaves(chosen_hidden, rejected_hidden, weight, bias)
    loss, chosen_rewards, rejected_rewards = cai_kernels.reward_pairwise_loss(
        ch, chosen_mask, rh, rejected_mask, w, b, soft_labels=soft_labels, margin=margin, backend=backend)
    acc = torch.float64 if chosen_hidden.dtype == torch.float64 else torch.float32
    assert loss.dtype == chosen_rewards.dtype == rejected_rewards.dtype == acc
    assert loss.shape == () and chosen_rewards.shape == rejected_rewards.shape == (chosen_hidden.size(0),)

    ref_ch, ref_rh, ref_w, ref_b = double_leaves(chosen_hidden, rejected_hidden, weight, bias)
    labels = soft_labels.double() if isinstance(soft_labels, torch.Tensor) else soft_labels
    ref_loss, ref_chosen, ref_rejected = reference(ref_ch, chosen_mask, ref_rh, rejected_mask, ref_w, ref_b,
                                                   soft_labels=labels, margin=margin)
    assert_close(loss, ref_loss, **FP32_TOL, msg="loss")
    assert_close(chosen_rewards, ref_chosen, **FP32_TOL, msg="chosen rewards")
    assert_close(rejected_rewards, ref_rejected, **FP32_TOL, msg="rejected rewards")

    centering = lambda c, r: reward_weight * torch.cat([c, r]).pow(2).mean()  # noqa: E731
    (loss + centering(chosen_rewards, rejected_rewards)).backward()
    (ref_loss + centering(ref_chosen, ref_rejected)).backward()
    hidden_tol = FP32_TOL if chosen_hidden.dtype in (torch.float32, torch.float64) else grad_tolerance(
        chosen_hidden.dtype)
    head_tol = FP32_TOL if weight.dtype in (torch.float32, torch.float64) else grad_tolerance(weight.dtype)
    assert ch.grad.dtype == chosen_hidden.dtype and w.grad.dtype == weight.dtype
    assert_close(ch.grad, ref_ch.grad, **hidden_tol, msg="gradient w.r.t. chosen_hidden")
    assert_close(rh.grad, ref_rh.grad, **hidden_tol, msg="gradient w.r.t. rejected_hidden")
    assert_close(w.grad, ref_w.grad, **head_tol, msg="gradient w.r.t. head_weight")
    if bias is not None:
        assert b.grad.shape == bias.shape
        assert_close(b.grad, ref_b.grad, **head_tol, msg="gradient w.r.t. head_bias")
    return ch.grad, rh.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_matches_reference(backend, dtype):
    B, H = 5, 67
    weight, bias = random_head(H)
    check_forward_backward(random_hidden(B, 11, H, dtype=dtype), padded_mask(B, 11, "right"),
                           random_hidden(B, 13, H, dtype=dtype), padded_mask(B, 13, "left"), weight, bias, backend,
                           soft_labels=torch.rand(B, device=DEVICE), margin=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["right", "left", "holes", "full"])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.int32, torch.uint8], ids=str)
def test_padding_styles_and_mask_dtypes(backend, style, mask_dtype):
    B, T, H = 6, 9, 40
    weight, bias = random_head(H)
    chosen_mask, rejected_mask = padded_mask(B, T, style, mask_dtype), padded_mask(B, T, style, mask_dtype)
    grad_chosen, _ = check_forward_backward(random_hidden(B, T, H), chosen_mask, random_hidden(B, T, H),
                                            rejected_mask, weight, bias, backend)
    # the gradient reaches the hidden states only at each sequence's last real token
    last = last_token_index(chosen_mask)
    touched = grad_chosen.abs().sum(-1) != 0
    expected = torch.zeros_like(touched)
    expected[torch.arange(B), last] = True
    assert torch.equal(touched, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_shape,with_bias", [((24,), True), ((1, 24), True), ((1, 24), False),
                                                    ((24,), "1-element")])
def test_head_shapes(backend, weight_shape, with_bias):
    B, T, H = 3, 7, 24
    weight, bias = random_head(H, bias=bool(with_bias), weight_shape=weight_shape)
    if with_bias == "1-element":
        bias = bias.reshape(1)
    check_forward_backward(random_hidden(B, T, H), padded_mask(B, T, "right"), random_hidden(B, T, H),
                           padded_mask(B, T, "left"), weight, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_head_and_hidden(backend):
    B, T, H = 4, 6, 48
    weight, bias = random_head(H, dtype=torch.bfloat16)
    check_forward_backward(random_hidden(B, T, H, dtype=torch.bfloat16), padded_mask(B, T, "right"),
                           random_hidden(B, T, H, dtype=torch.bfloat16), padded_mask(B, T, "holes"), weight, bias,
                           backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["time_major", "time_slice", "hidden_stride", "pair_halves"])
def test_non_contiguous_hidden(backend, view):
    B, T, H = 4, 10, 36
    if view == "time_major":                  # (T, B, H) storage seen as (B, T, H)
        chosen, rejected = random_hidden(T, B, H).transpose(0, 1), random_hidden(T, B, H).transpose(0, 1)
    elif view == "time_slice":                # a slice of the time axis: the last position dropped
        chosen, rejected = random_hidden(B, T + 1, H)[:, :-1], random_hidden(B, T + 1, H)[:, 1:]
    elif view == "hidden_stride":             # stride(-1) != 1
        chosen, rejected = random_hidden(B, T, 2 * H)[..., ::2], random_hidden(B, T, H, 2)[..., 1]
    else:                                     # one forward over the concatenated pairs, split in halves
        both = random_hidden(2 * B, T, H)
        chosen, rejected = both[:B], both[B:]
        both_leaf = both.detach().requires_grad_()
        loss, _, _ = cai_kernels.reward_pairwise_loss(both_leaf[:B], padded_mask(B, T, "right"), both_leaf[B:],
                                                      padded_mask(B, T, "right"), *random_head(H), backend=backend)
        loss.backward()
        assert both_leaf.grad.shape == both.shape
    check_forward_backward(chosen, padded_mask(B, T, "right"), rejected, padded_mask(B, T, "left"), *random_head(H),
                           backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_masks(backend):
    B, T, H = 3, 8, 20
    chosen_mask = padded_mask(B, T, "right").t().contiguous().t()    # (B, T) with strides (1, B)
    rejected_mask = padded_mask(B, 2 * T, "left")[:, ::2]
    rejected_mask[:, -1] = 1
    check_forward_backward(random_hidden(B, T, H), chosen_mask, random_hidden(B, T, H), rejected_mask, *random_head(H),
                           backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_backbone_trains_only_the_head(backend):
    # hidden states that need no gradient: only the head gets one (no dense (B, T, H) gradient is made)
    B, T, H = 4, 5, 16
    weight, bias = leaves(*random_head(H))
    chosen, rejected = random_hidden(B, T, H), random_hidden(B, T, H)
    loss, _, _ = cai_kernels.reward_pairwise_loss(chosen, padded_mask(B, T, "right"), rejected,
                                                  padded_mask(B, T, "right"), weight, bias, backend=backend)
    loss.backward()
    assert weight.grad is not None and bias.grad is not None
    assert chosen.grad is None and rejected.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["chosen_mask", "rejected_mask"])
def test_sequence_without_real_token_is_a_value_error(backend, which):
    B, T, H = 3, 6, 8
    masks = {"chosen_mask": padded_mask(B, T, "right"), "rejected_mask": padded_mask(B, T, "left")}
    masks[which][1] = 0
    with pytest.raises(ValueError, match=rf"{which}: every sequence needs at least one real token.*sequence 1 "):
        cai_kernels.reward_pairwise_loss(random_hidden(B, T, H), masks["chosen_mask"], random_hidden(B, T, H),
                                         masks["rejected_mask"], *random_head(H), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    B, T, H = 3, 5, 6
    chosen, rejected = random_hidden(B, T, H, dtype=torch.float64), random_hidden(B, T + 1, H, dtype=torch.float64)
    weight, bias = random_head(H, dtype=torch.float64)
    chosen_mask, rejected_mask = padded_mask(B, T, "holes"), padded_mask(B, T + 1, "left")
    labels = torch.rand(B, dtype=torch.float64, device=DEVICE)

    def step(c, r, w, b):
        loss, chosen_rewards, rejected_rewards = cai_kernels.reward_pairwise_loss(
            c, chosen_mask, r, rejected_mask, w, b, soft_labels=labels, margin=0.2, backend=backend)
        return loss, chosen_rewards, rejected_rewards

    # the interpreter runs a full gradcheck (one forward per input element) in a minute: random projections there
    assert torch.autograd.gradcheck(step, tuple(leaves(chosen, rejected, weight, bias)),
                                    fast_mode=backend == "triton")


@pytest.mark.slow
def test_cpu_acceptance_shape():
    # the benchmark shape of the issue, B = 64, T = 512, H = 576, fp32: within 1e-6 of the reference
    if DEVICE.type != "cpu":
        pytest.skip("the C++ backend runs on CPU tensors")
    B, T, H = 64, 512, 576
    weight, bias = random_head(H)
    check_forward_backward(random_hidden(B, T, H), padded_mask(B, T, "right"), random_hidden(B, T, H),
                           padded_mask(B, T, "left"), weight, bias, "cpu", soft_labels=torch.rand(B, device=DEVICE))


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 5),
    lengths=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    hidden_size=st.integers(1, 70),
    dtype=st.sampled_from(LOW_PRECISION + (torch.float64,)),
    styles=st.tuples(st.sampled_from(["right", "left", "holes", "full"]),
                     st.sampled_from(["right", "left", "holes", "full"])),
    with_bias=st.booleans(),
    backend=st.sampled_from([p.values[0] for p in BACKENDS]),
)
def test_property_matches_reference(batch, lengths, hidden_size, dtype, styles, with_bias, backend):
    chosen, rejected = random_hidden(batch, lengths[0], hidden_size, dtype=dtype), random_hidden(
        batch, lengths[1], hidden_size, dtype=dtype)
    chosen_mask, rejected_mask = padded_mask(batch, lengths[0], styles[0]), padded_mask(batch, lengths[1], styles[1])
    weight, bias = random_head(hidden_size, bias=with_bias)
    loss, chosen_rewards, _ = cai_kernels.reward_pairwise_loss(chosen, chosen_mask, rejected, rejected_mask, weight,
                                                               bias, backend=backend)
    ref_loss, ref_chosen, _ = reference(chosen.double(), chosen_mask, rejected.double(), rejected_mask,
                                        weight.double(), None if bias is None else bias.double())
    assert_close(loss, ref_loss, rtol=2e-6, atol=2e-6)
    assert_close(chosen_rewards, ref_chosen, rtol=2e-6, atol=2e-6)


# ---- bad input: a TypeError / ValueError naming the argument ----------------------------------------

ALL_BACKENDS = [pytest.param("reference", id="reference")] + BACKENDS


def pm_inputs(B=2, T=4, H=8):
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    return dict(chosen_hidden=torch.randn(B, T, H, device=DEVICE), chosen_mask=mask,
                rejected_hidden=torch.randn(B, T, H, device=DEVICE), rejected_mask=mask.clone(),
                head_weight=torch.randn(H, device=DEVICE), head_bias=torch.zeros((), device=DEVICE))


@pytest.mark.parametrize("change,error,pattern", [
    (dict(chosen_hidden=torch.randn(2, 8)), ValueError, r"chosen_hidden must have 3 dimensions"),
    (dict(rejected_hidden=torch.randn(2, 4, 8, dtype=torch.float64)), TypeError,
     r"rejected_hidden must have the dtype of chosen_hidden"),
    (dict(rejected_hidden=torch.randn(3, 4, 8), rejected_mask=torch.ones(3, 4, dtype=torch.long)), ValueError,
     r"rejected_hidden must be \(B=2, T, H=8\)"),
    (dict(rejected_hidden=torch.randn(2, 4, 9)), ValueError, r"rejected_hidden must be \(B=2, T, H=8\)"),
    (dict(chosen_mask=torch.ones(2, 4)), TypeError, r"chosen_mask must be bool or an integer dtype"),
    (dict(rejected_mask=torch.ones(2, 5, dtype=torch.long)), ValueError,
     r"rejected_mask must have shape \(2, 4\) \(rejected_hidden.shape\[:-1\]\)"),
    (dict(chosen_mask=[[1, 1, 1, 1]] * 2), TypeError, r"chosen_mask must be a torch.Tensor"),
    (dict(head_weight=torch.randn(8, 1)), ValueError, r"head_weight must have shape \(8,\) or \(1, 8\)"),
    (dict(head_weight=torch.ones(8, dtype=torch.long)), TypeError, r"head_weight must have dtype"),
    (dict(head_bias=torch.zeros(2)), ValueError, r"head_bias must be a 0-d or 1-element tensor"),
    (dict(chosen_hidden=torch.randn(2, 0, 8), chosen_mask=torch.ones(2, 0, dtype=torch.long)), ValueError,
     r"chosen_hidden must have at least one position"),
    (dict(chosen_hidden=torch.randn(0, 4, 8), chosen_mask=torch.ones(0, 4, dtype=torch.long),
          rejected_hidden=torch.randn(0, 4, 8), rejected_mask=torch.ones(0, 4, dtype=torch.long)), ValueError,
     r"at least one pair"),
])
def test_arguments(change, error, pattern):
    inputs = pm_inputs()
    inputs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(error, match=pattern):
        cai_kernels.reward_pairwise_loss(**inputs)


def test_devices_and_labels():
    inputs = pm_inputs()
    with pytest.raises(ValueError, match="chosen_mask must be on the same device as chosen_hidden"):
        cai_kernels.reward_pairwise_loss(**{**inputs, "chosen_mask": inputs["chosen_mask"].to("meta")})
    with pytest.raises(ValueError, match="head_weight must be on the same device"):
        cai_kernels.reward_pairwise_loss(**{**inputs, "head_weight": inputs["head_weight"].to("meta")})
    with pytest.raises(ValueError, match=r"soft_labels must be broadcastable to the rewards' shape \(2,\)"):
        cai_kernels.reward_pairwise_loss(**inputs, soft_labels=torch.rand(3, device=DEVICE))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_label_values(backend):
    with pytest.raises(ValueError, match=r"soft_labels must lie in \[0, 1\]"):
        cai_kernels.reward_pairwise_loss(**pm_inputs(), soft_labels=torch.tensor([0.5, 1.5], device=DEVICE),
                                         backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_padding_row(backend):
    inputs = pm_inputs()
    inputs["rejected_mask"][0] = 0
    with pytest.raises(ValueError, match=r"rejected_mask: every sequence needs at least one real token .* "
                                         r"sequence 0 \(row 0\) has none"):
        cai_kernels.reward_pairwise_loss(**inputs, backend=backend)
