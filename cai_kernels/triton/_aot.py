"""Ahead-of-time compile checks of every Triton kernel for GPUs, on a machine without one.

Each op's module (``cai_kernels/triton/<op>.py``, its "family") lists ``AOT_SPECS``: the pointer and
float argument types (every other argument is an i64), the constexprs, and which arguments the JIT
would see as multiples of 16 (aligned pointers, row lengths and strides, what it specializes on).
Each spec is compiled with ``triton.compile`` for sm_80 and
sm_90a; Triton's bundled ``ptxas-blackwell -v`` reports registers and spills of the PTX, and
``cuobjdump -sass`` shows whether memory-bound kernels issue 128-bit global loads (``LDG.E.128``).

Run ``python -m cai_kernels.triton._aot [--json]`` with TRITON_INTERPRET unset (the interpreter
replaces @triton.jit functions with objects the compiler cannot take).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

ARCHS = {"sm_80": 80, "sm_90a": 90}
# the matrix instruction a tensor-core kernel must issue on each arch
TENSOR_CORE_OPS = {"sm_80": "HMMA", "sm_90a": "HGMMA"}
MATRIX_OPCODES = ("HGMMA", "HMMA", "QGMMA", "IMMA", "DMMA")


@dataclass(frozen=True)
class AotSpec:
    """One compiled variant of a kernel: what the JIT would build for one dtype / flag combination."""

    kernel: str                       # attribute name of the @triton.jit function in its module
    signature: dict[str, str]         # pointers ("*bf16", ...) and float scalars ("fp32"); the rest: i64
    constexprs: dict[str, object]     # every constexpr argument's value
    aligned: tuple[str, ...]          # arguments divisible by 16, as the JIT specializes them
    num_warps: int = 4
    wide_loads: bool = True           # memory-bound: its SASS must hold LDG.E.128
    label: str = ""
    num_stages: int | None = None     # None: Triton's default
    tensor_cores: bool = False        # a GEMM: its SASS must hold TENSOR_CORE_OPS[arch]
    archs: tuple[str, ...] = tuple(ARCHS)  # the archs this variant is built for (blockings differ)


def full_signature(kernel, spec: AotSpec) -> dict[str, str]:
    """Every argument of ``kernel``: constexprs, the spec's pointer and float types, i64 for the rest."""
    return {name: "constexpr" if name in spec.constexprs else spec.signature.get(name, "i64")
            for name in kernel.arg_names}


@dataclass
class AotResult:
    family: str
    kernel: str
    label: str
    arch: str
    registers: int | None = None
    spill_bytes: int | None = None
    load_kinds: list[str] = field(default_factory=list)
    wide_loads_required: bool = True
    matrix_ops: dict[str, int] = field(default_factory=dict)  # SASS matrix instruction -> count
    tensor_core_op: str | None = None  # the matrix instruction required (tensor-core specs)
    num_warps: int = 4
    num_stages: int | None = None
    shared_bytes: int | None = None
    triton_version: str = ""
    # tensor-core specs: how the GEMM operand tiles ([BLOCK_M|N, BLOCK_K] / [BLOCK_K, BLOCK_M|N]) are
    # loaded, read from the TTGIR: 16-byte cp.async copies (pipelined), narrower ones, or plain loads
    operand_loads: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def wide_loads(self) -> bool:
        return any(kind == "LDG.E.128" or (kind.startswith("LDGSTS") and kind.endswith(".128"))
                   or kind.startswith("UTMALDG") for kind in self.load_kinds)

    @property
    def has_tensor_core_op(self) -> bool:
        return self.tensor_core_op is None or any(op.split(".")[0] == self.tensor_core_op for op in self.matrix_ops)

    @property
    def operands_pipelined(self) -> bool:
        """Every GEMM operand tile arrives by 16-byte cp.async copies (vacuous for other specs)."""
        return self.tensor_core_op is None or (self.operand_loads.get("async_16B", 0) > 0
                                               and not self.operand_loads.get("async_narrow")
                                               and not self.operand_loads.get("plain"))

    @property
    def ok(self) -> bool:
        return (self.error is None and self.spill_bytes == 0 and self.has_tensor_core_op and self.operands_pipelined
                and (not self.wide_loads_required or self.wide_loads))


def _tools_dir() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_spec(family: str, module, spec: AotSpec, arch: str) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = AotResult(family, spec.kernel, spec.label, arch, wide_loads_required=spec.wide_loads,
                       tensor_core_op=TENSOR_CORE_OPS[arch] if spec.tensor_cores else None,
                       num_warps=spec.num_warps, num_stages=spec.num_stages, triton_version=triton.__version__)
    kernel = getattr(module, spec.kernel)
    try:
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
        source = ASTSource(fn=kernel, signature=full_signature(kernel, spec), constexprs=spec.constexprs,
                           attrs=attrs)
        options = {"num_warps": spec.num_warps}
        if spec.num_stages is not None:
            options["num_stages"] = spec.num_stages
        compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch], 32), options=options)
        result.shared_bytes = getattr(compiled.metadata, "shared", None)
        if spec.tensor_cores:
            result.operand_loads = _operand_loads(compiled.asm["ttgir"], spec.constexprs)
        with tempfile.TemporaryDirectory() as tmp:
            ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
            with open(ptx_path, "w") as f:
                f.write(compiled.asm["ptx"])
            ptxas = subprocess.run([os.path.join(_tools_dir(), "ptxas-blackwell"), f"-arch={arch}", "-v",
                                    ptx_path, "-o", cubin_path], capture_output=True, text=True, check=True)
            registers = re.search(r"Used (\d+) registers", ptxas.stderr)
            spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas.stderr)
            result.registers = int(registers.group(1)) if registers else None
            result.spill_bytes = sum(int(a) + int(b) for a, b in spills)
            with open(cubin_path, "wb") as f:
                f.write(compiled.asm["cubin"])
            sass = subprocess.run([os.path.join(_tools_dir(), "cuobjdump"), "-sass", cubin_path],
                                  capture_output=True, text=True, check=True).stdout
            result.load_kinds = sorted(set(re.findall(r"\b(?:LDG\.E|LDGSTS|UTMALDG)[.\w]*", sass)))
            for op in re.findall(r"\b(?:%s)\.[.\w]+" % "|".join(MATRIX_OPCODES), sass):
                result.matrix_ops[op] = result.matrix_ops.get(op, 0) + 1
    except Exception as error:  # noqa: BLE001 - report every failure, keep checking the rest
        result.error = f"{type(error).__name__}: {error}"[:2000]
    return result


_ELEMENT_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i8": 1, "f8E4M3FN": 1, "f8E5M2": 1}


def _operand_loads(ttgir: str, constexprs: dict) -> dict[str, int]:
    """Counts the loads of 2-D tiles shaped like a GEMM operand in a kernel's TTGIR: cp.async copies of
    16 bytes per thread ("async_16B"), narrower ones ("async_narrow"), and plain tt.load ("plain":
    through registers, outside the software pipeline)."""
    m, n, k = (constexprs.get(name) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    shapes = {f"{a}x{b}" for a, b in ((m, k), (k, n), (k, m), (n, k)) if a and b}
    counts: dict[str, int] = {}
    for line in ttgir.splitlines():
        tile = re.search(r"tensor<(\d+x\d+)x!tt\.ptr<(\w+)>", line)
        if not tile or tile.group(1) not in shapes:
            continue
        if "async_copy_global_to_local" in line:
            contiguity = re.search(r"contiguity = (\d+)", line)
            width = int(contiguity.group(1)) * _ELEMENT_BYTES.get(tile.group(2), 0) if contiguity else 0
            kind = "async_16B" if width >= 16 else "async_narrow"
        elif re.search(r"= tt\.load ", line):
            kind = "plain"
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def family_modules():
    """(family name, module) for every module of this package that declares AOT_SPECS."""
    package = importlib.import_module("cai_kernels.triton")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"cai_kernels.triton.{info.name}")
        if hasattr(module, "AOT_SPECS"):
            yield info.name, module


def check_all(families: list[str] | None = None) -> list[AotResult]:
    results = []
    for family, module in family_modules():
        if families and family not in families:
            continue
        for spec in module.AOT_SPECS:
            for arch in spec.archs:
                results.append(compile_spec(family, module, spec, arch))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--family", action="append", help="only these families (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled ahead of time")
    results = check_all(args.family)
    if not args.json:
        import triton
        print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)})")
    if args.json:
        print(json.dumps([asdict(r) | {"ok": r.ok, "wide_loads": r.wide_loads, "operands_pipelined": r.operands_pipelined}
                          for r in results]))
    else:
        for r in results:
            status = "ok  " if r.ok else "FAIL"
            detail = r.error or f"{r.registers} regs, {r.spill_bytes} B spilled, loads {' '.join(r.load_kinds)}"
            if r.matrix_ops or r.tensor_core_op:
                ops = " ".join(f"{op} x{count}" for op, count in sorted(r.matrix_ops.items())) or "none"
                detail += f", matrix ops {ops}" + (f" (needs {r.tensor_core_op})" if r.tensor_core_op else "")
            if r.operand_loads:
                detail += ", operand tiles " + " ".join(f"{kind} x{count}" for kind, count in sorted(r.operand_loads.items()))
            print(f"{status} {r.family}.{r.kernel}[{r.label}] {r.arch}: {detail}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
