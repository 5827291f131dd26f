"""Bisects the segfault seen on the H200 image (torch 2.11.0+cu130, Python 3.12, GCC 13, AVX-512 Xeon):
the AVX-512 build's CPU-backend tests crashed the process on every path where a C++ kernel raises
ValueError (TORCH_CHECK_VALUE), instead of raising. The AVX2 development machine (torch 2.13 CPU)
cannot reproduce it, so this runs the matrix on the machine that can, in one short call:

  python -m benchmarks.segv_probe            # ~2-4 minutes (one small build per flag set)

For each SIMD flag set (none, avx2, avx512 if the CPU has it) it builds a tiny dispatcher op library
with the same flags as setup.py, then calls each case in a fresh subprocess (CUDA hidden) and prints
the exit status: "ValueError"/"RuntimeError" (fine) or "SIGSEGV" (the bug). Cases: TORCH_CHECK_VALUE vs
TORCH_CHECK, with and without an at::parallel_for before the throw, called directly through
torch.ops and from inside a torch.library.custom_op (the path the library uses). Then the real failing
tests once per built capability of cai_kernels (CAI_KERNELS_CPU_CAPABILITY=avx2 / avx512), and, if gdb
is installed, the native backtrace of the first crashing case.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

static void spin(const at::Tensor& x) {
  double* p = x.data_ptr<double>();
  at::parallel_for(0, x.numel(), 1, [&](int64_t b, int64_t e) { for (int64_t i = b; i < e; ++i) p[i] += 1; });
}
at::Tensor value_plain(const at::Tensor& x) { TORCH_CHECK_VALUE(false, "probe value ", 7); return x; }
at::Tensor check_plain(const at::Tensor& x) { TORCH_CHECK(false, "probe check ", 7); return x; }
at::Tensor value_after_parallel(const at::Tensor& x) { spin(x); TORCH_CHECK_VALUE(false, "probe value ", 7); return x; }
at::Tensor check_after_parallel(const at::Tensor& x) { spin(x); TORCH_CHECK(false, "probe check ", 7); return x; }
at::Tensor value_item(const at::Tensor& x) {
  spin(x); TORCH_CHECK_VALUE(false, "probe value ", x[0].item<double>()); return x;
}

TORCH_LIBRARY(NAMESPACE, m) {
  m.def("value_plain(Tensor x) -> Tensor");
  m.def("check_plain(Tensor x) -> Tensor");
  m.def("value_after_parallel(Tensor x) -> Tensor");
  m.def("check_after_parallel(Tensor x) -> Tensor");
  m.def("value_item(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(NAMESPACE, CPU, m) {
  m.impl("value_plain", value_plain);
  m.impl("check_plain", check_plain);
  m.impl("value_after_parallel", value_after_parallel);
  m.impl("check_after_parallel", check_after_parallel);
  m.impl("value_item", value_item);
}
"""

CASES = ["value_plain", "check_plain", "value_after_parallel", "check_after_parallel", "value_item"]

CALL = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
op = getattr(getattr(torch.ops, sys.argv[4]), sys.argv[2])
x = torch.zeros(64, dtype=torch.float64)
if sys.argv[3] == "custom_op":
    @torch.library.custom_op("probe_py::wrap", mutates_args=())
    def wrap(x: torch.Tensor) -> torch.Tensor:
        return op(x)
    fn = wrap
else:
    fn = op
try:
    fn(x)
except Exception as e:
    print(type(e).__name__)
"""

FLAGS = {
    "none": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}

# the files that hold the error-path tests which segfaulted there (split per op since)
FAILING_TESTS = [
    "tests/test_token_logprobs.py", "tests/test_linear_token_logprobs.py", "tests/test_choice_logprobs.py",
    "tests/test_pairwise_loss.py", "tests/test_last_token_rewards.py", "tests/test_reward_pairwise_loss.py",
    "tests/test_ranked_pairwise_loss.py", "tests/test_reward_ranked_loss.py",
]


def _outcome(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode < 0:
        return {-11: "SIGSEGV", -6: "SIGABRT", -4: "SIGILL"}.get(proc.returncode, f"signal {-proc.returncode}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"rc={proc.returncode}"


def main() -> int:
    import torch
    from torch.utils.cpp_extension import load_inline

    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    has_avx512 = "avx512f" in open("/proc/cpuinfo").read()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    first_crash = None
    for name, flags in FLAGS.items():
        if name == "avx512" and not has_avx512:
            continue
        build_dir = tempfile.mkdtemp(prefix=f"segv_probe_{name}_")
        # one op namespace per build: load_inline also loads each library into this process
        load_inline(f"segv_probe_{name}", cpp_sources=SOURCE.replace("NAMESPACE", f"segv_probe_{name}"),
                    extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"], build_directory=build_dir,
                    is_python_module=False, verbose=False)
        lib = os.path.join(build_dir, f"segv_probe_{name}.so")
        for case in CASES:
            for path in ("direct", "custom_op"):
                argv = [sys.executable, "-X", "faulthandler", "-c", CALL, lib, case, path, f"segv_probe_{name}"]
                proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
                outcome = _outcome(proc)
                print(f"{name:7s} {case:22s} {path:10s} {outcome}", flush=True)
                if outcome.startswith("SIG") and first_crash is None:
                    first_crash = argv
    for capability in ("avx2", "avx512"):
        if capability == "avx512" and not has_avx512:
            continue
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                               "-k", "out_of_range or layout_errors or without_real_token or first_pair",
                               *FAILING_TESTS],
                              capture_output=True, text=True, timeout=300,
                              env=dict(env, CAI_KERNELS_CPU_CAPABILITY=capability))
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        print(f"cai_kernels _C_{capability}: rc={proc.returncode} | " + " | ".join(tail), flush=True)
    if first_crash is not None and subprocess.run(["which", "gdb"], capture_output=True).returncode == 0:
        gdb = ["gdb", "-batch", "-ex", "run", "-ex", "bt 25", "--args", *first_crash]
        proc = subprocess.run(gdb, capture_output=True, text=True, env=env, timeout=180)
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("#")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
