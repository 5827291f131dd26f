// Errors that a caller's bad argument values cause inside a kernel.
#pragma once

#include <c10/util/Exception.h>

// Raised as a plain TORCH_CHECK (a c10::Error built inside libc10) whose message starts with
// "ValueError: "; the kernel accessor (cai_kernels/_extension.py, cpu_kernels) re-raises it as a
// Python ValueError. Not TORCH_CHECK_VALUE: through torch 2.11 its c10::ValueError is constructed
// inline in this module, and the AVX-512 build segfaulted there on torch 2.11 (H200 host,
// 2026-11-25); TORCH_CHECK takes the out-of-line libc10 path every check in torch itself takes.
#define CAI_CHECK_VALUE(cond, ...) TORCH_CHECK(cond, "ValueError: ", __VA_ARGS__)
