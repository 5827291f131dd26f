"""cai_kernels.integrations.trl against the real TRL from PyPI (pinned in the `test` extra).

Each adapter is compared with TRL's own function (captured before any patching) on fresh random
inputs: fp32 / bf16, temperatures, masks with holes, non-contiguous views, the top-K index form,
and the gradients. Then `apply_to_trl()` is checked in place (every module that imported a name,
undo), and a TRL DPOTrainer step on a tiny in-process model gives the same loss patched and not.
"""

from __future__ import annotations

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")
trl_kernels = pytest.importorskip("trl.kernels.chunked_logprob")

from cai_helpers import _one_thread, tiny_model_dir  # noqa: E402,F401 (fixtures)
from cai_kernels.integrations import trl as adapter  # noqa: E402
from cai_kernels.integrations._patching import Unsupported  # noqa: E402

# TRL's own implementations, captured before any test patches them
TRL_SELECTIVE = trl_utils.selective_log_softmax
TRL_ENTROPY = trl_utils.entropy_from_logits
TRL_BOTH = trl_utils.selective_log_softmax_and_entropy
TRL_CHUNKED = trl_kernels.ChunkedLogProbFunction

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _logits(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _holes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=g) > 0.3
    mask.view(-1)[0] = False
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_selective_log_softmax_matches_trl(dtype, temperature, masked):
    logits = _logits((3, 6, 37), dtype, seed=1)[:, :-1]  # a non-contiguous view, as trainers pass
    index = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(2))
    row_mask = _holes((3, 5), 3) if masked else None
    ours = adapter.selective_log_softmax(logits, index, temperature, row_mask)
    theirs = TRL_SELECTIVE(logits, index, temperature, row_mask)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours.float(), theirs.float(), **TOL[dtype])
    if masked:
        assert (ours[~row_mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_top_k_form(dtype):
    logits = _logits((2, 4, 50), dtype, seed=4)
    index = torch.topk(logits.float(), 5, dim=-1).indices.to(torch.int32)  # TRL accepts int32 too
    row_mask = _holes((2, 4, 5), 5)
    for mask in (None, row_mask):
        ours = adapter.selective_log_softmax(logits, index, 0.8, mask)
        theirs = TRL_SELECTIVE(logits, index.long(), 0.8, mask)
        assert ours.shape == (2, 4, 5) and ours.dtype == dtype
        torch.testing.assert_close(ours.float(), theirs.float(), **TOL[dtype])


def test_selective_log_softmax_gradients_match_trl():
    base = _logits((2, 5, 23), torch.float32, seed=6)
    index = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(7))
    topk = torch.randint(0, 23, (2, 5, 3), generator=torch.Generator().manual_seed(8))
    weight = torch.randn(2, 5)
    for idx, w in ((index, weight), (topk, weight.unsqueeze(-1).expand(2, 5, 3))):
        grads = []
        for fn in (adapter.selective_log_softmax, TRL_SELECTIVE):
            logits = base.clone().requires_grad_(True)
            (fn(logits, idx, 0.9, _holes(idx.shape, 9)) * w).sum().backward()
            grads.append(logits.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_selective_log_softmax_temperature_check():
    with pytest.raises(ValueError, match="temperature must be positive"):
        adapter.selective_log_softmax(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits_matches_trl(dtype):
    logits = _logits((3, 7, 41), dtype, seed=10)
    logits[0, 0] = -1e4  # a flat row
    ours, theirs = adapter.entropy_from_logits(logits), TRL_ENTROPY(logits)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours.float(), theirs.float(), **TOL[dtype])
    base = logits.float()
    grads = []
    for fn in (adapter.entropy_from_logits, TRL_ENTROPY):
        x = base.clone().requires_grad_(True)
        (fn(x) * torch.linspace(-1, 1, 21).view(3, 7)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_selective_log_softmax_and_entropy_matches_trl(requires_grad):
    logits = _logits((2, 6, 29), torch.float32, seed=11).requires_grad_(True)
    index = torch.randint(0, 29, (2, 6), generator=torch.Generator().manual_seed(12))
    mask = _holes((2, 6), 13)
    ours = adapter.selective_log_softmax_and_entropy(logits, index, requires_grad, 1.3, mask)
    theirs = TRL_BOTH(logits, index, requires_grad, 1.3, mask)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ours[1].requires_grad == theirs[1].requires_grad == requires_grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature,logit_scale", [(1.0, 1.0), (0.7, 1.5)])
def test_chunked_logprob_function_matches_trl(bias, temperature, logit_scale):
    g = torch.Generator().manual_seed(14)
    hidden0, weight0 = torch.randn(9, 16, generator=g), torch.randn(45, 16, generator=g) * 0.5
    bias0 = torch.randn(45, generator=g) if bias else None
    targets = torch.randint(0, 45, (9,), generator=g)
    targets[3] = int(torch.argmax(hidden0[3] @ weight0.t() + (bias0 if bias else 0)))  # one sure top-1 hit
    outputs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    results, grads = [], []
    for fn in (adapter.ChunkedLogProbFunction.apply, TRL_CHUNKED.apply):
        hidden, weight = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
        b = bias0.clone().requires_grad_(True) if bias else None
        out = fn(hidden, weight, b, targets, temperature, 16, None, logit_scale, outputs)
        (out[0] * torch.linspace(0.5, 1.5, 9)).sum().backward(retain_graph=True)
        (out[1] * 0.3).sum().backward()
        results.append(out)
        grads.append([hidden.grad, weight.grad] + ([b.grad] if bias else []))
    for a, b in zip(*results):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_logprob_function_under_bf16_autocast():
    """TRL casts to the autocast dtype and rounds each logits tile to bf16; we cast the same way but
    keep the logits in fp32, so we are at least as close to the exact log-probs of the cast inputs."""
    g = torch.Generator().manual_seed(18)
    hidden, weight = torch.randn(16, 32, generator=g), torch.randn(300, 32, generator=g)
    targets = torch.randint(0, 300, (16,), generator=g)
    exact = torch.log_softmax(hidden.bfloat16().double() @ weight.bfloat16().double().t(), -1)
    exact = exact.gather(-1, targets[:, None]).squeeze(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = adapter.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("log_probs",))
        theirs = TRL_CHUNKED.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ("log_probs",))
    ours_err, their_err = (ours[0].double() - exact).abs().max(), (theirs[0].double() - exact).abs().max()
    assert ours_err < 1e-4 and ours_err <= their_err
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=8 * their_err.item())


def test_chunked_logprob_function_default_outputs():
    g = torch.Generator().manual_seed(15)
    hidden, weight, targets = torch.randn(4, 8, generator=g), torch.randn(20, 8, generator=g), torch.arange(4)
    ours = adapter.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 8, None, 1.0, ("log_probs",))
    theirs = TRL_CHUNKED.apply(hidden, weight, None, targets, 1.0, 8, None, 1.0, ("log_probs",))
    assert ours[1:] == (None, None, None, None) == theirs[1:]
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)


def test_softcapping_is_unsupported_and_falls_back_when_patched():
    g = torch.Generator().manual_seed(16)
    hidden, weight, targets = torch.randn(4, 8, generator=g), torch.randn(20, 8, generator=g), torch.arange(4)
    with pytest.raises(Unsupported, match="soft-cap"):
        adapter.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 8, 30.0)
    with adapter.apply_to_trl():
        patched = trl_kernels.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 8, 30.0, 1.0,
                                                          ("log_probs",))
    torch.testing.assert_close(patched[0], TRL_CHUNKED.apply(hidden, weight, None, targets, 1.0, 8, 30.0, 1.0,
                                                             ("log_probs",))[0])


def test_apply_to_trl_patches_every_importer_and_undoes():
    import importlib
    import sys

    # it did `from ...trainer.utils import selective_log_softmax`
    cpo = importlib.import_module("trl.experimental.cpo.cpo_trainer")
    handle = adapter.apply_to_trl()
    try:
        assert trl_utils.selective_log_softmax is not TRL_SELECTIVE
        assert cpo.selective_log_softmax is trl_utils.selective_log_softmax
        assert trl_utils.entropy_from_logits.__wrapped__ is adapter.entropy_from_logits
        assert sys.modules["trl.kernels"].ChunkedLogProbFunction is trl_utils._ChunkedLogProbFunction
        assert trl_utils._ChunkedLogProbFunction is not TRL_CHUNKED
        assert "trl.experimental.cpo.cpo_trainer.selective_log_softmax" in handle.patched
        logits, index = _logits((2, 3, 11), torch.float32, 17), torch.zeros(2, 3, dtype=torch.long)
        torch.testing.assert_close(cpo.selective_log_softmax(logits, index), TRL_SELECTIVE(logits, index))
    finally:
        handle.undo()
    assert trl_utils.selective_log_softmax is TRL_SELECTIVE and cpo.selective_log_softmax is TRL_SELECTIVE
    assert trl_utils._ChunkedLogProbFunction is TRL_CHUNKED and trl_kernels.ChunkedLogProbFunction is TRL_CHUNKED
    assert trl_utils.entropy_from_logits is TRL_ENTROPY and trl_utils.selective_log_softmax_and_entropy is TRL_BOTH


def _dpo_losses(model_dir, out_dir, patched: bool) -> list[float]:
    """Per-step training losses of 2 DPO steps on a tiny model (fresh model, same seed each time).

    bf16=False: TRL's configs default to bf16 autocast, under which TRL rounds each logits tile to
    bf16 while our kernel keeps the logits in fp32; in fp32 the two agree to rounding.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list([
        {"prompt": "Human: how do I bake bread?", "chosen": " Mix flour, water and yeast, then bake.",
         "rejected": " I won't help."},
        {"prompt": "Human: name a colour.", "chosen": " Blue.", "rejected": " Bread."},
        {"prompt": "Human: is the sea salty?", "chosen": " Yes, it is.", "rejected": " Purple."},
        {"prompt": "Human: say hi.", "chosen": " Hi!", "rejected": " No."},
    ])
    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                     max_length=64, dataloader_num_workers=0, disable_tqdm=True, bf16=False)
    handle = adapter.apply_to_trl() if patched else None
    try:
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
    finally:
        if handle is not None:
            handle.undo()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
def test_dpo_trainer_step_same_loss_patched(tiny_model_dir, tmp_path):
    """TRL's DPO trainer (fused LM head -> ChunkedLogProbFunction) trains the same patched and unpatched.

    Two optimizer steps: the second loss depends on the first step's gradients, so the backward
    of the adapter is checked too.
    """
    reference = _dpo_losses(tiny_model_dir, tmp_path / "plain", patched=False)
    ours = _dpo_losses(tiny_model_dir, tmp_path / "patched", patched=True)
    assert len(reference) == 2 and all(torch.isfinite(torch.tensor(reference)))
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(reference), rtol=1e-4, atol=1e-5)


trl_fused = pytest.importorskip("trl.kernels.logprob_entropy")  # TRL defines it when Triton is installed
TRL_KERNEL_BOTH = trl_fused.selective_log_softmax_and_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_selective_log_softmax_and_entropy_matches_trls_triton_kernel(dtype, masked):
    """``trl.kernels.selective_log_softmax_and_entropy``: TRL's own Triton kernel (here through the Triton
    interpreter) against the adapter: fp32 outputs for every logits dtype, masked rows 0, gradients."""
    base = _logits((2, 5, 301), dtype, 21)
    base[..., :100] += 8.0  # sharply different maxima across the vocabulary
    index = torch.randint(0, 301, (2, 5), generator=torch.Generator().manual_seed(22))[:, 1:4]
    row_mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)[:, 1:4] if masked else None
    outs, grads = [], []
    for fn in (adapter.kernel_selective_log_softmax_and_entropy, TRL_KERNEL_BOTH):
        logits = base.clone().requires_grad_(True)
        logps, entropy = fn(logits[:, 1:4], index, temperature=0.7, row_mask=row_mask)  # non-contiguous view
        (2.0 * logps + 0.5 * entropy).sum().backward()
        outs.append((logps, entropy))
        grads.append(logits.grad)
    for ours, theirs in zip(*outs):
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if masked:
        assert (outs[0][0][~row_mask] == 0).all() and (outs[0][1][~row_mask] == 0).all()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(grads[0].float(), grads[1].float(), **tol)


def test_apply_to_trl_patches_trl_kernels_everywhere():
    """Every name TRL exposes its fused log-prob / entropy kernel under gets the adapter, and undo restores it."""
    import sys

    trl_kernels_pkg = sys.modules["trl.kernels"]
    places = {"trl.kernels": (trl_kernels_pkg, "selective_log_softmax_and_entropy"),
              "trl.kernels.logprob_entropy": (trl_fused, "selective_log_softmax_and_entropy"),
              "trl.trainer.utils": (trl_utils, "_fused_logprob_entropy")}
    assert all(getattr(m, name) is TRL_KERNEL_BOTH for m, name in places.values())
    with adapter.apply_to_trl() as handle:
        for label, (module, name) in places.items():
            patched = getattr(module, name)
            assert patched.__wrapped__ is adapter.kernel_selective_log_softmax_and_entropy, label
            assert f"{label}.{name}" in handle.patched
        from trl.kernels import selective_log_softmax_and_entropy  # what TRL's kernel tests import
        assert selective_log_softmax_and_entropy.__wrapped__ is adapter.kernel_selective_log_softmax_and_entropy
        assert handle.not_patched == {}
    assert all(getattr(m, name) is TRL_KERNEL_BOTH for m, name in places.values())


def test_fused_path_rule_is_trls():
    """`_trl_fused_path` (fp32 results on TRL's GPU kernel path) against TRL's own ``_supports_trl_loss_kernel``,
    on stand-ins with CUDA / XPU / CPU devices, every dtype, ranks, strides and index / mask forms."""
    from types import SimpleNamespace

    def fake(shape, dtype, device="cuda", last_stride=1):
        return SimpleNamespace(shape=torch.Size(shape), dtype=dtype, ndim=len(shape), device=torch.device(device),
                               stride=lambda dim: last_stride)

    cases = []
    for device in ("cuda", "xpu", "cpu"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for shape in ((7,), (3, 7), (2, 3, 7), (2, 2, 3, 7), (3, 0)):
                logits = fake(shape, dtype, device)
                cases.append((logits, None, None))
                index = fake(shape[:-1], torch.int64, device)
                cases += [(logits, index, None), (logits, fake(shape[:-1] + (2,), torch.int64, device), None),
                          (logits, fake(shape[:-1], torch.int16, device), None),
                          (logits, index, fake(shape[:-1], torch.bool, device)),
                          (logits, index, fake(shape[:-1], torch.float32, device)),
                          (logits, index, fake(shape[:-1], torch.int32, "cpu"))]
        cases.append((fake((3, 7), torch.float32, device, last_stride=2), None, None))
    assert any(trl_utils._supports_trl_loss_kernel(*case) for case in cases)
    for case in cases:
        assert adapter._trl_fused_path(*case) == (trl_utils._supports_trl_loss_kernel(*case)
                                                  and trl_utils.is_triton_available())


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at |x| (x float64)."""
    tiny = torch.finfo(dtype).tiny
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=tiny))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accuracy_contract(dtype):
    """The README's contract: in fp16 / bf16 our results are the exact value rounded once (<= 0.5 ulp of the
    dtype, plus fp32 noise), never farther from it than TRL's; TRL's half-precision CPU path is off by up to
    ~1 ulp (log-probs) / ~3 ulp (entropy), so TRL's bit-equality tests see 1-3 ulp differences."""
    logits = _logits((4, 32, 1024), dtype, 23, scale=1.0)
    index = torch.randint(0, 1024, (4, 32), generator=torch.Generator().manual_seed(24))
    exact_logp = torch.gather(logits.double().log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)
    logp64 = logits.double().log_softmax(-1)
    exact_entropy = -(logp64.exp() * logp64).sum(-1)
    for ours, theirs, exact, trl_max_ulp in (
            (adapter.selective_log_softmax(logits, index), TRL_SELECTIVE(logits, index), exact_logp, 1.1),
            (adapter.entropy_from_logits(logits), TRL_ENTROPY(logits), exact_entropy, 4.0)):
        assert ours.dtype == theirs.dtype == dtype
        ulp = _ulp(exact, dtype)
        our_err, their_err = (ours.double() - exact).abs() / ulp, (theirs.double() - exact).abs() / ulp
        assert our_err.max() <= 0.5 + 1e-3
        assert (our_err <= their_err + 1e-3).all()
        assert their_err.max() <= trl_max_ulp
        differ = (ours != theirs).double().mean()
        assert 0 < differ < 0.9  # they do differ (TRL's bit-equality tests fail patched) -- by at most a few ulp
        assert ((ours.double() - theirs.double()).abs() / ulp).max() <= trl_max_ulp + 0.5
