"""One GPU call for the tensor-core fused LM head (cai_kernels/triton/linear_head.py): correctness on
CUDA, timings against the bare bf16 GEMMs and the peers, a block-config sweep, memory, and the
"loss weights up front" experiment. Prints one table last; full numbers go to a JSON file.

    python -m benchmarks.linear_head_gpu [--out DIR] [--no-sweep] [--budget SECONDS]
    python -m benchmarks.linear_head_gpu --dry-run     # CPU, Triton's interpreter, tiny shapes

Sections (each prints as it finishes, so a run cut short still reports what it measured):
  ceilings     an 8192^3 bf16 torch.mm (TFLOP/s on random data) and a device-to-device copy (GB/s)
  correctness  bf16 / fp16 / fp32 (TF32 off: exact fp32), bias, temperature, ignore_index, entropy,
               against torch: log-probs of the fp32-accumulated GEMM of the same operands
               (``torch.mm(h.float(), w.float().T)``) and its autograd gradients, at small odd shapes
               and at both acceptance shapes; outputs poisoned with NaN first (every element must be
               written); two runs bit-identical (the deterministic default)
  timings      at [16384, 576]x[49152, 576] and [8192, 4096]x[128256, 4096], bf16: ours fwd, fwd+bwd
               (+entropy), the bare bf16 GEMMs (logits fwd; + grad_hidden + grad_weight), Liger's
               fused linear cross-entropy and Cut Cross-Entropy (reduction "sum", fwd+bwd), and the
               up-front experiment; triton.testing.do_bench medians over 3 rotated input sets; peak
               extra memory (beyond inputs and the returned gradients) of each fwd+bwd
  routing      exact fp32 (TF32 off) and fp64: linear_head against the hybrid engine and the bare cuBLAS
               GEMMs, fwd+bwd; the summary names the faster engine for each (EXACT_ROUTES)
  sweep        forward tiles x warps x stages x pieces, dz-kernel tiles, grad-GEMM tiles, vocab chunk:
               each stage timed alone at both shapes, under a time budget
Peers come from .whl/ (``make gpu-wheels`` on a machine with internet; carry .whl): installed with
--no-deps into /tmp/cai-site when not importable, else reported as skipped.

The up-front experiment (not public API; the issue asks to ship it only if it wins): with the
per-token loss weights known in the forward (what Liger / quack do for a scalar loss), one pass can
store the fp32 logits, take lse and dz from them, and run the two gradient GEMMs: 3 GEMMs instead of
the default path's 4 (forward + recompute + 2), at the price of an (N, V) fp32 logits buffer and an
(N, V) dz buffer (300 % of a bf16 logits tensor here; a shipped version would chunk the tokens and
carry grad_weight in fp32 across chunks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # before triton is imported: the interpreter decides at @triton.jit time
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from cai_kernels.triton import linear_head as lh  # noqa: E402
from cai_kernels.triton.linear_head import _logits_tile  # noqa: E402  (a JIT function: callable from kernels)

SITE = "/tmp/cai-site"


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    vocab: int

    @property
    def label(self) -> str:
        return f"[{self.tokens}, {self.hidden}]x[{self.vocab}, {self.hidden}]"

    @property
    def gemm_flops(self) -> int:
        return 2 * self.tokens * self.hidden * self.vocab

    @property
    def logits_bytes_bf16(self) -> int:
        return 2 * self.tokens * self.vocab


ACCEPTANCE = [Shape(16384, 576, 49152), Shape(8192, 4096, 128256)]
DRY_SHAPES = [Shape(64, 48, 300), Shape(40, 64, 520)]


def device() -> torch.device:
    return torch.device("cpu" if DRY_RUN else "cuda")


def log(*parts) -> None:
    print(*parts, flush=True)


# -- timing -------------------------------------------------------------------------------------------

def bench(fn, *, rep_ms: float = 150) -> float:
    """Median milliseconds of fn(): do_bench (CUDA events) on the GPU, one wall-clock call on the CPU."""
    if DRY_RUN:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    fn()  # compile / first-touch outside the timing
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


class Rotation:
    """Cycles through several input sets, so that repeated calls do not run out of L2."""

    def __init__(self, sets):
        self.sets, self.i = sets, 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def make_sets(shape: Shape, dtype=torch.bfloat16, count: int = 3, with_bias: bool = False):
    """count input sets (hidden, weight, bias, targets, ones as the upstream grad): logits ~ N(0, 1)."""
    g = torch.Generator(device=device()).manual_seed(shape.tokens + shape.vocab)
    sets = []
    for _ in range(count):
        h = torch.randn(shape.tokens, shape.hidden, generator=g, device=device()).to(dtype)
        w = (torch.randn(shape.vocab, shape.hidden, generator=g, device=device()) / shape.hidden**0.5).to(dtype)
        b = torch.randn(shape.vocab, generator=g, device=device()).to(dtype) if with_bias else None
        t = torch.randint(0, shape.vocab, (shape.tokens,), generator=g, device=device())
        sets.append(dict(h=h, w=w, b=b, t=t, ones=torch.ones(shape.tokens, device=device())))
    return sets


# -- our launchers as the op would call them ------------------------------------------------------------

def ours_fwd(s, config=None, entropy=False):
    return lh.linear_token_logprobs_fwd(s["h"], s["w"], s["b"], s["t"], 1.0, 0, False, entropy, config=config)


def ours_bwd(s, lse, entropy_out, config=None, grad_entropy=None):
    ge = grad_entropy if grad_entropy is not None else lse.new_empty(0)
    return lh.linear_token_logprobs_bwd(s["ones"], ge, s["h"], s["w"], s["b"], s["t"], lse, entropy_out, 1.0, 0, False,
                                        True, True, s["b"] is not None, config=config)


def ours_fwd_bwd(s, config=None, entropy=False):
    logp, ent, lse = ours_fwd(s, config, entropy)
    return ours_bwd(s, lse, ent, config, grad_entropy=s["ones"] if entropy else None)


# -- the up-front experiment -----------------------------------------------------------------------------

@triton.jit
def upfront_logits_kernel(x_ptr, w_ptr, logits_ptr, N, V, H, stride_xn, stride_wv, stride_l,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 logits (N, V) of bf16 x (N, H) and w (V, H), grouped tile order (the experiment's GEMM 1)."""
    pid = tl.program_id(0)
    token_tiles = tl.cdiv(N, BLOCK_M)
    vocab_tiles = tl.cdiv(V, BLOCK_N)
    group = pid // (GROUP_M * vocab_tiles)
    first_m = group * GROUP_M
    group_size = tl.minimum(token_tiles - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * vocab_tiles)) % group_size
    tile_n = (pid % (GROUP_M * vocab_tiles)) // group_size
    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _logits_tile(x_ptr, w_ptr, tl.minimum(rows, N - 1) * stride_xn,
                          tl.minimum(cols, V - 1).to(tl.int64) * stride_wv, H, 1, 1,
                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, tl.float32, "tf32", UPCAST)
    tl.store(logits_ptr + rows[:, None] * stride_l + cols[None, :], acc, mask=(rows < N)[:, None] & (cols < V)[None, :])


@triton.jit
def upfront_dz_kernel(logits_ptr, targets_ptr, weights_ptr, d_ptr, logp_ptr, N, V, stride_l, stride_d,
                      BLOCK_V: tl.constexpr):
    """Per row: lse of the stored logits (pass 1), then dz = ([k == t] - p) g in bf16 and log p (pass 2)."""
    row = tl.program_id(0).to(tl.int64)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(logits_ptr + row * stride_l + cols, mask=cols < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    g = tl.load(weights_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(logits_ptr + row * stride_l + cols, mask=cols < V, other=float("-inf"))
        dz = tl.where(cols == target, g, 0.0) - tl.exp(z - lse) * g
        tl.store(d_ptr + row * stride_d + cols, dz.to(d_ptr.dtype.element_ty), mask=cols < V)
    tl.store(logp_ptr + row, tl.load(logits_ptr + row * stride_l + target) - lse)


def upfront_fwd_bwd(s, config=None):
    """log p and the gradients of sum(weights * log p), weights (= ones) known up front: 3 GEMMs."""
    cfg = config or lh.default_config(device())
    h, w, t, g = s["h"], s["w"], s["t"], s["ones"]
    N, H = h.shape
    V = w.size(0)
    logits = torch.empty((N, V), dtype=torch.float32, device=h.device)
    blocks = cfg.dlogits
    grid = (triton.cdiv(N, blocks.block_m) * triton.cdiv(V, blocks.block_n),)
    upcast = DRY_RUN and h.dtype == torch.bfloat16
    upfront_logits_kernel[grid](h, w, logits, N, V, H, h.stride(0), w.stride(0), logits.stride(0),
                                BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
                                GROUP_M=cfg.group_m, EVEN_K=H % blocks.block_k == 0, UPCAST=upcast,
                                num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    gr = cfg.grad
    dz = torch.empty((N, triton.cdiv(V, gr.block_m) * gr.block_m), dtype=h.dtype, device=h.device)  # whole tiles
    logp = torch.empty(N, dtype=torch.float32, device=h.device)
    upfront_dz_kernel[(N,)](logits, t, g, dz, logp, N, V, logits.stride(0), dz.stride(0),
                            BLOCK_V=min(4096, triton.next_power_of_2(V)), num_warps=8)
    del logits
    grad_hidden = torch.empty_like(h)
    grad_weight = torch.empty_like(w)
    h_tiles = triton.cdiv(H, gr.block_n)
    weight_tiles = triton.cdiv(V, gr.block_m) * h_tiles
    lh.linear_head_grad_kernel[(weight_tiles + triton.cdiv(N, gr.block_m) * h_tiles,)](
        dz, h, w, grad_weight, grad_hidden, grad_hidden, N, H, 0, V, dz.stride(0), N, 0, h.stride(0), 1, w.stride(0),
        1, grad_weight.stride(0), grad_hidden.stride(0), weight_tiles,
        ACCUMULATE_X=False, HAS_LO=False, EVEN_N=N % gr.block_k == 0, EVEN_WIDTH=V % gr.block_k == 0,
        EVEN_H=H % gr.block_n == 0, SPLIT_ROWS=False, BLOCK_M=gr.block_m, BLOCK_N=gr.block_n, BLOCK_K=gr.block_k, ACC=tl.float32, DOT_PRECISION="tf32",
        UPCAST=upcast, num_warps=gr.num_warps, num_stages=gr.num_stages)
    return logp, grad_hidden, grad_weight


# -- peers and baselines -----------------------------------------------------------------------------------

def ensure_peers() -> None:
    """Install .whl/ into SITE (no deps: the image has torch and triton) when a peer is not importable."""
    try:
        import cut_cross_entropy  # noqa: F401
        import liger_kernel  # noqa: F401
        return
    except Exception:  # noqa: BLE001
        pass
    wheels = [os.path.join(".whl", f) for f in sorted(os.listdir(".whl"))] if os.path.isdir(".whl") else []
    wheels = [w for w in wheels if w.endswith(".whl") and ("liger" in w or "cut_cross" in w)]
    if wheels and not DRY_RUN:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", SITE, *wheels], check=False)
    if os.path.isdir(SITE) and SITE not in sys.path:
        sys.path.insert(0, SITE)


def peer_fns():
    """name -> (fn(h, w, t) -> scalar loss, or None, why)."""
    from benchmarks import peers
    out = {}
    for name, factory in (("liger fused linear CE", peers.liger_fused_linear_cross_entropy),
                          ("cut cross-entropy", peers.cut_cross_entropy)):
        fn, why = factory()
        out[name] = (fn, why)
    return out


def peer_fwd_bwd(fn):
    def step(s):
        h = s.setdefault("h_leaf", s["h"].detach().requires_grad_())
        w = s.setdefault("w_leaf", s["w"].detach().requires_grad_())
        h.grad = w.grad = None
        fn(h, w, s["t"]).backward()
        return h.grad, w.grad
    return step


def bare_fwd(s):
    return torch.mm(s["h"], s["w"].t())


def bare_fwd_bwd(s):
    """The three GEMMs of an unfused head: logits, grad_hidden = G W, grad_weight = G^T X (G a random bf16
    (N, V) upstream gradient, allocated once per input set); the logits are its extra memory."""
    logits = torch.mm(s["h"], s["w"].t())
    g = s.setdefault("g", torch.randn_like(logits))
    grads = torch.mm(g, s["w"]), torch.mm(g.t(), s["h"])
    del logits
    return grads


# -- memory ------------------------------------------------------------------------------------------------

def peak_extra_bytes(step, s) -> int | None:
    """Peak allocated during one step beyond what was live before it and the tensors it returns."""
    if DRY_RUN:
        return None
    step(s)  # warm: compile, workspaces, persistent buffers of the peers
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = step(s)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    kept = torch.cuda.memory_allocated() - before  # what the step returned or left behind (e.g. .grad)
    del out
    return peak - before - kept


# -- correctness -------------------------------------------------------------------------------------------

def reference(h, w, b, t, temperature, ignore_index, upstream_logp, upstream_entropy):
    """torch on the GPU: logits = fp32-accumulated GEMM of the operands (+ b), then float64 softmax
    math and autograd: (logp, entropy, grad_h, grad_w, grad_b) in fp32 / fp64."""
    hf = h.float().requires_grad_()
    wf = w.float().requires_grad_()
    bf = None if b is None else b.float().requires_grad_()
    logits = torch.mm(hf, wf.t())
    if bf is not None:
        logits = logits + bf
    z = logits.double() / temperature
    lp_all = z.log_softmax(-1)
    active = t != ignore_index if ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
    safe_t = torch.where(active, t, 0)
    logp = lp_all.gather(1, safe_t[:, None]).squeeze(1) * active
    p = lp_all.exp()
    entropy = -(p * lp_all.masked_fill(p == 0, 0.0)).sum(-1) * active
    loss = (logp * upstream_logp.double()).sum() + (entropy * upstream_entropy.double()).sum()
    grads = torch.autograd.grad(loss, [x for x in (hf, wf, bf) if x is not None])
    return logp.detach(), entropy.detach(), grads


def relative_error(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def poison_allocator(nbytes: int) -> None:
    """Fill a block with NaN and free it: the caching allocator hands it to the next allocations, so an
    output element the kernels never write reads NaN."""
    if not DRY_RUN:
        torch.full((nbytes // 4,), float("nan"), device="cuda")


def check_case(shape: Shape, dtype, *, bias, temperature, ignore, entropy, config=None) -> dict:
    g = torch.Generator(device=device()).manual_seed(7)
    h = torch.randn(shape.tokens, shape.hidden, generator=g, device=device()).to(dtype)
    w = (torch.randn(shape.vocab, shape.hidden, generator=g, device=device()) * (3 / shape.hidden**0.5)).to(dtype)
    b = torch.randn(shape.vocab, generator=g, device=device()).to(dtype) if bias else None
    t = torch.randint(0, shape.vocab, (shape.tokens,), generator=g, device=device())
    ignore_index = -100 if ignore else None
    if ignore:
        t[::7] = -100
    up_lp = torch.rand(shape.tokens, generator=g, device=device())
    up_ent = torch.rand(shape.tokens, generator=g, device=device()) - 0.5 if entropy else up_lp.new_zeros(0)

    def run():
        poison_allocator(4 * (shape.tokens * (shape.hidden + 8) + shape.vocab * (shape.hidden + 1)) + (64 << 20))
        logp, ent, lse = lh.linear_token_logprobs_fwd(h, w, b, t, 1 / temperature, ignore_index or 0, ignore,
                                                      entropy, config=config)
        grads = lh.linear_token_logprobs_bwd(up_lp, up_ent, h, w, b, t, lse, ent, 1 / temperature, ignore_index or 0,
                                             ignore, True, True, bias, config=config)
        return (logp, ent, lse) + tuple(grads)

    first = run()
    second = run()
    deterministic = all(torch.equal(x, y) for x, y in zip(first, second))
    ref_logp, ref_ent, ref_grads = reference(h, w, b, t, temperature, ignore_index, up_lp,
                                             up_ent if entropy else torch.zeros_like(up_lp))
    logp, ent, _, gh, gw, gb = first
    scale = ref_logp.abs().max().item() + 1
    result = dict(case=f"{shape.label} {str(dtype).split('.')[-1]}"
                       f"{' bias' if bias else ''}{' T=%.2g' % temperature if temperature != 1 else ''}"
                       f"{' ignore' if ignore else ''}{' entropy' if entropy else ''}",
                  logp_max_abs=(logp.double() - ref_logp).abs().max().item() / scale,
                  entropy_max_abs=(ent.double() - ref_ent).abs().max().item() / scale if entropy else 0.0,
                  grad_hidden_rel=relative_error(gh, ref_grads[0]), grad_weight_rel=relative_error(gw, ref_grads[1]),
                  grad_bias_rel=relative_error(gb, ref_grads[2]) if bias else 0.0,
                  nan=any(bool(torch.isnan(x).any()) for x in first if x.numel()),
                  deterministic=deterministic)
    # fp32 accumulation of the logits (relative to their size); gradients: dz rounded once to the
    # operand dtype (bf16 2^-9, fp16 2^-12 relative per element; norm-wise a fraction of that)
    grad_tol = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}[dtype]
    result["ok"] = (result["logp_max_abs"] < 5e-5 and result["entropy_max_abs"] < 5e-5 and not result["nan"]
                    and deterministic and max(result["grad_hidden_rel"], result["grad_weight_rel"],
                                              result["grad_bias_rel"]) < grad_tol)
    return result


def correctness(shapes) -> list[dict]:
    small = Shape(37, 40, 301) if DRY_RUN else Shape(1000, 200, 5003)
    cases = [(small, torch.bfloat16, dict(bias=True, temperature=0.7, ignore=True, entropy=True)),
             (small, torch.float16, dict(bias=True, temperature=1.3, ignore=False, entropy=True)),
             (small, torch.float32, dict(bias=False, temperature=1.0, ignore=True, entropy=False))]
    cases += [(shape, torch.bfloat16, dict(bias=False, temperature=1.0, ignore=False, entropy=False)) for shape in shapes]
    results = []
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 case: exact fp32 on both sides
    try:
        for shape, dtype, kwargs in cases:
            result = check_case(shape, dtype, **kwargs)
            log(f"  {'ok  ' if result['ok'] else 'FAIL'} {result['case']}: logp {result['logp_max_abs']:.2e}, "
                f"grads rel {result['grad_hidden_rel']:.2e} / {result['grad_weight_rel']:.2e} / "
                f"{result['grad_bias_rel']:.2e}, deterministic {result['deterministic']}")
            results.append(result)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    results.append(check_upfront(small))
    log(f"  {'ok  ' if results[-1]['ok'] else 'FAIL'} {results[-1]['case']}: logp {results[-1]['logp_max_abs']:.2e}, "
        f"grads rel {results[-1]['grad_hidden_rel']:.2e} / {results[-1]['grad_weight_rel']:.2e}")
    return results


def check_upfront(shape: Shape) -> dict:
    """The up-front experiment computes what the default path computes (sum of log p, weights 1)."""
    s = make_sets(shape, count=1)[0]
    logp, grad_hidden, grad_weight = upfront_fwd_bwd(s)
    ours_logp, _, _ = ours_fwd(s)
    ours_h, ours_w, _ = ours_fwd_bwd(s)
    result = dict(case=f"{shape.label} bf16 up-front experiment vs linear_head",
                  logp_max_abs=(logp - ours_logp).abs().max().item() / (ours_logp.abs().max().item() + 1),
                  grad_hidden_rel=relative_error(grad_hidden, ours_h), grad_weight_rel=relative_error(grad_weight, ours_w),
                  deterministic=True)
    result["ok"] = result["logp_max_abs"] < 5e-5 and max(result["grad_hidden_rel"], result["grad_weight_rel"]) < 1e-2
    return result


# -- timings -----------------------------------------------------------------------------------------------

def timings(shape: Shape, peers: dict) -> list[dict]:
    sets = make_sets(shape, count=1 if DRY_RUN else 3)
    rows = []

    def add(name, mode, step, flops, memory=True):
        rotation = Rotation(sets)
        try:
            ms = bench(lambda: step(rotation.next()))
            extra = peak_extra_bytes(step, sets[0]) if memory else None
        except Exception as error:  # noqa: BLE001 - a failing variant must not end the run
            rows.append(dict(shape=shape.label, variant=name, mode=mode, error=f"{type(error).__name__}: {error}"[:300]))
            log(f"  {name} {mode}: FAILED {rows[-1]['error']}")
            return
        row = dict(shape=shape.label, variant=name, mode=mode, ms=ms, tflops=flops / ms / 1e9,
                   extra_mb=None if extra is None else extra / 2**20,
                   extra_pct_of_bf16_logits=None if extra is None else 100 * extra / shape.logits_bytes_bf16)
        rows.append(row)
        log(f"  {name:<34} {mode:<8} {ms:9.3f} ms  {row['tflops']:7.1f} TFLOP/s"
            + ("" if extra is None else f"  extra {row['extra_mb']:8.1f} MB ({row['extra_pct_of_bf16_logits']:.1f} %)"))

    f1, f3 = shape.gemm_flops, 3 * shape.gemm_flops
    add("bare bf16 GEMMs", "fwd", bare_fwd, f1, memory=False)
    add("bare bf16 GEMMs", "fwd+bwd", bare_fwd_bwd, f3)
    add("linear_head", "fwd", lambda s: ours_fwd(s), f1)
    add("linear_head", "fwd+bwd", lambda s: ours_fwd_bwd(s), f3)
    add("linear_head +entropy", "fwd+bwd", lambda s: ours_fwd_bwd(s, entropy=True), f3)
    add("up-front weights (experiment)", "fwd+bwd", upfront_fwd_bwd, f3)
    for name, (fn, why) in peers.items():
        if fn is None:
            rows.append(dict(shape=shape.label, variant=name, mode="fwd+bwd", error=f"skipped: {why}"))
            log(f"  {name}: skipped ({why})")
        else:
            add(name, "fwd+bwd", peer_fwd_bwd(fn), f3)
    for s in sets:
        s.pop("h_leaf", None), s.pop("w_leaf", None), s.pop("g", None)
    if shape == (DRY_SHAPES if DRY_RUN else ACCEPTANCE)[0]:
        rows += exact_timings(shape)
    return rows


EXACT_FP64_SHAPE = Shape(4096, 576, 49152)  # fp64 runs at ~1/15 of the bf16 rate: a quarter of the tokens


def exact_timings(shape: Shape) -> list[dict]:
    """The routing table of triton/linear_token_logprobs.py (EXACT_ROUTES), fwd+bwd: exact fp32 (torch's
    default, TF32 off: linear_head's tl.dot on FMA units) and fp64 (DMMA) on linear_head against the
    hybrid (cuBLAS GEMMs + Triton row kernels) and the bare cuBLAS GEMMs; fp32 under TF32 (linear_head,
    the route it always takes) for reference. Rows carry ``group``; the summary names the faster engine."""
    rows = []
    cases = [(shape, torch.float32, "fp32 exact", False), (shape, torch.float32, "fp32 tf32", True),
             (DRY_SHAPES[0] if DRY_RUN else EXACT_FP64_SHAPE, torch.float64, "fp64", False)]
    for case_shape, dtype, group, tf32 in cases:
        sets = make_sets(case_shape, dtype=dtype, count=1 if DRY_RUN else 2)
        variants = [("bare GEMMs", bare_fwd_bwd), ("linear_head", ours_fwd_bwd)]
        if not tf32:
            variants.append(("hybrid", _hybrid_fwd_bwd))
        for engine, step in variants:
            before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            name = f"{group}: {engine}"
            try:
                rotation = Rotation(sets)
                ms = bench(lambda: step(rotation.next()))
                extra = peak_extra_bytes(step, sets[0])
                rows.append(dict(shape=case_shape.label, variant=name, group=group, engine=engine, mode="fwd+bwd",
                                 ms=ms, tflops=3 * case_shape.gemm_flops / ms / 1e9,
                                 extra_mb=None if extra is None else extra / 2**20,
                                 extra_pct_of_bf16_logits=None if extra is None
                                 else 100 * extra / case_shape.logits_bytes_bf16))
                log(f"  {name:<34} fwd+bwd  {ms:9.3f} ms  {rows[-1]['tflops']:7.1f} TFLOP/s  {case_shape.label}")
            except Exception as error:  # noqa: BLE001
                rows.append(dict(shape=case_shape.label, variant=name, group=group, engine=engine, mode="fwd+bwd",
                                 error=f"{type(error).__name__}: {error}"[:300]))
                log(f"  {name}: FAILED {rows[-1]['error']}")
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before
        del sets
    return rows


def _hybrid_fwd_bwd(s):
    """The hybrid engine of triton/linear_token_logprobs.py with the op's default blocking."""
    from cai_kernels._params import LinearTokenLogprobsParams
    from cai_kernels.triton import linear_token_logprobs as ltl

    params = LinearTokenLogprobsParams(1.0, None, False, ltl.VOCAB_BLOCK, ltl.TOKEN_CHUNK)
    h3 = s["h"].unsqueeze(0)  # the op's (outer, inner, H) rows view
    logp, ent, lse = ltl._hybrid_fwd(h3, s["w"], None, s["t"], params)
    return ltl._hybrid_bwd(s["ones"], lse.new_empty(0), h3, s["w"], None, s["t"], lse, ent, True, True, False, params)


def routing_verdict(rows) -> list[str]:
    """One line per exact dtype: the engine EXACT_ROUTES should name (the faster fwd+bwd)."""
    lines = []
    for group, dtype in (("fp32 exact", "torch.float32"), ("fp64", "torch.float64")):
        timed = {r["engine"]: r["ms"] for r in rows if r.get("group") == group and "ms" in r}
        if "hybrid" in timed and "linear_head" in timed:
            best = min(("hybrid", "linear_head"), key=timed.get)
            lines.append(f"  EXACT_ROUTES[{dtype}] = {best!r}: hybrid {timed['hybrid']:.3f} ms, linear_head "
                         f"{timed['linear_head']:.3f} ms, bare GEMMs {timed.get('bare GEMMs', float('nan')):.3f} ms")
        else:
            lines.append(f"  EXACT_ROUTES[{dtype}]: not settled (an engine failed: see the timings)")
    return lines


# -- sweep -------------------------------------------------------------------------------------------------

def sweep_candidates():
    if DRY_RUN:
        B = lh.Blocks
        return dict(fwd=[B(16, 32, 16), B(32, 32, 16)], dlogits=[B(16, 32, 16), B(32, 16, 16)],
                    grad=[B(16, 32, 16), B(32, 32, 16)], waves=[1, 4], chunk_scale=[0.5, 2.0])
    B = lh.Blocks
    return dict(
        # 4 warps on 64-row tiles: 2-3 programs per SM, so one program's softmax overlaps another's MMAs
        fwd=[B(128, 128, 64, 8, 3), B(128, 128, 64, 8, 4), B(128, 256, 64, 8, 3), B(64, 128, 64, 4, 4),
             B(64, 128, 64, 4, 3), B(64, 256, 64, 4, 3), B(128, 64, 64, 4, 4), B(256, 128, 64, 8, 3)],
        dlogits=[B(128, 128, 64, 8, 3), B(128, 128, 64, 8, 4), B(128, 256, 64, 8, 3), B(64, 128, 64, 4, 4),
                 B(128, 64, 64, 4, 4)],
        grad=[B(128, 128, 64, 8, 3), B(128, 128, 64, 8, 4), B(128, 256, 64, 8, 3), B(128, 128, 64, 4, 4),
              B(64, 128, 64, 4, 4), B(256, 128, 64, 8, 3)],
        waves=[2, 4, 8], chunk_scale=[0.5, 2.0])


def sweep_configs(shape: Shape):
    """(stage, label, config) of every sweep point at one shape: one knob at a time around the default."""
    candidates = sweep_candidates()
    base = lh.default_config(device())
    sms = 1 if DRY_RUN else torch.cuda.get_device_properties(0).multi_processor_count
    points = [("fwd", _blocks_label(b), lh.with_config(base, fwd=b)) for b in candidates["fwd"]]
    for waves in candidates["waves"]:
        pieces = max(1, waves * sms // triton.cdiv(shape.tokens, base.fwd.block_m))
        points.append(("fwd", f"{_blocks_label(base.fwd)} pieces={pieces} ({waves} waves)",
                       lh.with_config(base, pieces=pieces)))
    points += [("bwd", "dz " + _blocks_label(b), lh.with_config(base, dlogits=b)) for b in candidates["dlogits"]]
    points += [("bwd", "grad " + _blocks_label(b), lh.with_config(base, grad=b)) for b in candidates["grad"]]
    default_chunk = lh.vocab_chunk(shape.tokens, shape.hidden, shape.vocab, torch.bfloat16, base)
    step = math.lcm(base.dlogits.block_n, base.grad.block_m, base.grad.block_k)
    for scale in [1.0] + candidates["chunk_scale"]:
        chunk = max(step, int(default_chunk * scale) // step * step)
        points.append(("bwd", f"vocab_chunk={chunk}{' (default)' if scale == 1.0 else ''}",
                       lh.with_config(base, vocab_chunk=chunk)))
    return points


def _replica(shape: Shape) -> Shape:
    """A small problem that the JIT specializes exactly like ``shape`` (same H, token and vocabulary counts
    and every chunk width divisible by 16 and by the tiles as in the real one): compiling it fills
    Triton's on-disk cache with the kernels the real shape will use."""
    assert shape.tokens % 128 == 0 and shape.vocab % 128 == 0
    return Shape(256, shape.hidden, 3 * 256)


def precompile_worker(index: int, count: int) -> None:
    """Compile this worker's share of the sweep's kernels (on replicas) into Triton's cache."""
    tasks = [(shape, stage, config) for shape in ACCEPTANCE for stage, _, config in sweep_configs(shape)]
    for shape, stage, config in tasks[index::count]:
        replica = _replica(shape)
        s = make_sets(replica, count=1)[0]
        small = lh.with_config(config, vocab_chunk=256)  # several chunks, each as wide (mod 128) as the real ones
        try:
            logp, ent, lse = ours_fwd(s, small if stage == "fwd" else lh.with_config(small, fwd=lh.default_config(
                device()).fwd))
            if stage == "bwd":
                ours_bwd(s, lse, ent, small)
        except Exception:  # noqa: BLE001 - the main process reports failures when it runs the config
            pass
    torch.cuda.synchronize()


def start_precompile(workers: int) -> list:
    """Background processes compiling the sweep while the main process checks and times."""
    if DRY_RUN or workers <= 0:
        return []
    return [subprocess.Popen([sys.executable, "-m", "benchmarks.linear_head_gpu", "--precompile-worker", str(i),
                              str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(workers)]


def sweep(shapes, deadline: float) -> list[dict]:
    """Each stage alone, one knob at a time around the default: forward (tiles x warps x stages, then
    pieces), backward dz kernel, backward grad kernel, vocabulary chunk."""
    base = lh.default_config(device())
    rows = []
    for shape in shapes:
        sets = make_sets(shape, count=1 if DRY_RUN else 2)
        saved = [ours_fwd(s, base) for s in sets]
        fns = {"fwd": lambda s, _saved, config: ours_fwd(s, config),
               "bwd": lambda s, saved_out, config: ours_bwd(s, saved_out[2], saved_out[1], config)}
        for stage, label, config in sweep_configs(shape):
            if time.monotonic() > deadline:
                log(f"  (time budget reached: the rest of the sweep is skipped)")
                return rows
            rotation = Rotation(list(zip(sets, saved)))
            started = time.monotonic()
            try:
                ms = bench(lambda: fns[stage](*rotation.next(), config), rep_ms=80)
            except Exception as error:  # noqa: BLE001 - e.g. out of shared memory at this tile
                rows.append(dict(shape=shape.label, stage=stage, config=label, error=f"{type(error).__name__}: {error}"[:200]))
                log(f"  {shape.label} {stage} {label}: FAILED {rows[-1]['error']}")
                continue
            rows.append(dict(shape=shape.label, stage=stage, config=label, ms=ms,
                             wall_s=time.monotonic() - started))
            log(f"  {shape.label} {stage:<4} {label:<48} {ms:9.3f} ms  ({rows[-1]['wall_s']:.1f} s incl. compile)")
    return rows


def _blocks_label(b: lh.Blocks) -> str:
    return f"{b.block_m}x{b.block_n}x{b.block_k} w{b.num_warps} s{b.num_stages}"


# -- ceilings ----------------------------------------------------------------------------------------------

def ceilings() -> dict:
    if DRY_RUN:
        return {}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: torch.mm(a, b))
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    out = dict(bf16_mm_tflops=2 * n**3 / ms / 1e9, copy_gbps=2 * src.numel() * 4 / copy_ms / 1e6)
    log(f"  bf16 mm 8192^3: {out['bf16_mm_tflops']:.0f} TFLOP/s; device copy: {out['copy_gbps']:.0f} GB/s "
        "(read + write)")
    return out


# -- report ------------------------------------------------------------------------------------------------

def summary(shapes, timing_rows, correct, sweep_rows) -> str:
    lines = ["", "== linear_head: summary (medians, bf16) =="]
    lines.append(f"correctness: {sum(r['ok'] for r in correct)}/{len(correct)} cases ok"
                 + ("" if all(r["ok"] for r in correct) else
                    " (FAILED: " + ", ".join(r["case"] for r in correct if not r["ok"]) + ")"))
    header = f"{'shape':<26} {'variant':<36} {'mode':<8} {'ms':>9} {'TFLOP/s':>8} {'x bare':>7} {'extra %':>8}"
    lines.append("(x bare: time over the bare GEMMs of the same dtype and mode; extra %: peak memory beyond inputs "
                 "and gradients, % of a bf16 (N, V) logits tensor)")
    lines.append(header)
    for shape in shapes:
        mine = [r for r in timing_rows if r["shape"] == shape.label]
        bare = {r["mode"]: r.get("ms") for r in mine if r["variant"] == "bare bf16 GEMMs"}
        for r in mine:
            if "ms" not in r:
                lines.append(f"{shape.label:<26} {r['variant']:<36} {r['mode']:<8} {r['error'][:60]}")
                continue
            if r.get("group"):  # exact / TF32 / fp64 rows: against the bare GEMMs of the same group
                base = next((o.get("ms") for o in mine if o.get("group") == r["group"] and o["engine"] == "bare GEMMs"),
                            None)
            else:
                base = bare.get(r["mode"])
            ratio = r["ms"] / base if base else float("nan")
            extra = "" if r.get("extra_pct_of_bf16_logits") is None else f"{r['extra_pct_of_bf16_logits']:8.1f}"
            lines.append(f"{shape.label:<26} {r['variant']:<36} {r['mode']:<8} {r['ms']:9.3f} {r['tflops']:8.1f} "
                         f"{ratio:7.2f} {extra}")
        checks = acceptance(mine, bare)
        lines.append(f"{'':<26} acceptance: " + "; ".join(f"{k} {'PASS' if v else 'FAIL'}" if v is not None
                                                          else f"{k} n/a" for k, v in checks.items()))
    exact_rows = [r for r in timing_rows if r.get("group")]
    if exact_rows:
        lines.append("routing of exact fp32 / fp64 (EXACT_ROUTES in cai_kernels/triton/linear_token_logprobs.py):")
        lines += routing_verdict(exact_rows)
    if sweep_rows:
        lines.append("sweep (best per stage):")
        for shape in shapes:
            for stage in ("fwd", "bwd"):
                done = [r for r in sweep_rows if r["shape"] == shape.label and r["stage"] == stage and "ms" in r]
                if done:
                    best = min(done, key=lambda r: r["ms"])
                    lines.append(f"  {shape.label:<26} {stage:<4} {best['config']:<48} {best['ms']:9.3f} ms "
                                 f"({len(done)} configs)")
    return "\n".join(lines)


def acceptance(rows, bare) -> dict:
    def ms(variant, mode):
        return next((r["ms"] for r in rows if r["variant"] == variant and r["mode"] == mode and "ms" in r), None)

    ours_fb, ours_f = ms("linear_head", "fwd+bwd"), ms("linear_head", "fwd")
    extra = next((r.get("extra_pct_of_bf16_logits") for r in rows if r["variant"] == "linear_head"
                  and r["mode"] == "fwd+bwd"), None)
    out = {
        "fwd+bwd <= 1.7x GEMMs": None if not (ours_fb and bare.get("fwd+bwd")) else ours_fb <= 1.7 * bare["fwd+bwd"],
        "fwd <= 1.3x GEMM": None if not (ours_f and bare.get("fwd")) else ours_f <= 1.3 * bare["fwd"],
        "extra mem <= 5%": None if extra is None else extra <= 5.0,
    }
    for peer in ("liger fused linear CE", "cut cross-entropy"):
        theirs = ms(peer, "fwd+bwd")
        out[f"faster than {peer}"] = None if not (theirs and ours_fb) else ours_fb < theirs
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="folder for the JSON")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--budget", type=float, default=100.0,
                        help="seconds after which the sweep stops starting new configs (default 100)")
    parser.add_argument("--precompile-workers", type=int, default=8,
                        help="background processes compiling the sweep's kernels meanwhile (0: none)")
    parser.add_argument("--precompile-worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.precompile_worker:
        precompile_worker(*args.precompile_worker)
        return 0
    started = time.monotonic()
    if not DRY_RUN and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run on a machine without a GPU")
    shapes = DRY_SHAPES if DRY_RUN else ACCEPTANCE
    env = dict(torch=torch.__version__, triton=triton.__version__,
               device=torch.cuda.get_device_name(0) if not DRY_RUN else "cpu (interpreter)")
    log(f"== linear_head GPU check: {env}")
    workers = start_precompile(0 if args.no_sweep else args.precompile_workers)
    ensure_peers()
    log("== ceilings")
    ceiling = ceilings()
    log("== correctness (against torch: fp32-accumulated GEMM of the same operands)")
    correct = correctness(shapes)
    log("== timings")
    peers = peer_fns()
    timing_rows = [row for shape in shapes for row in timings(shape, peers)]
    sweep_rows = []
    if not args.no_sweep:
        for worker in workers:  # their kernels are in Triton's cache now (or compile here if not)
            try:
                worker.wait(timeout=max(1.0, started + args.budget / 2 - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
        log(f"== sweep (until {args.budget:.0f} s into the run)")
        sweep_rows = sweep(shapes, started + args.budget)
    report = dict(env=env, ceilings=ceiling, correctness=correct, timings=timing_rows, sweep=sweep_rows,
                  configs=dict(hopper=asdict(lh.HOPPER), ampere=asdict(lh.AMPERE)),
                  seconds=time.monotonic() - started)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"linear_head_gpu{'-dry-run' if DRY_RUN else ''}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    log(summary(shapes, timing_rows, correct, sweep_rows))
    log(f"({report['seconds']:.0f} s; full numbers in {path})")
    return 0 if all(r["ok"] for r in correct) else 1


if __name__ == "__main__":
    sys.exit(main())
