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
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.spill_bytes == 0
                and (not self.wide_loads_required or "LDG.E.128" in self.load_kinds))


def _tools_dir() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_spec(family: str, module, spec: AotSpec, arch: str) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = AotResult(family, spec.kernel, spec.label, arch, wide_loads_required=spec.wide_loads)
    kernel = getattr(module, spec.kernel)
    try:
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
        source = ASTSource(fn=kernel, signature=full_signature(kernel, spec), constexprs=spec.constexprs,
                           attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch], 32),
                                  options={"num_warps": spec.num_warps})
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
            result.load_kinds = sorted(set(re.findall(r"LDG\.E[.\w]*", sass)))
    except Exception as error:  # noqa: BLE001 - report every failure, keep checking the rest
        result.error = f"{type(error).__name__}: {error}"[:2000]
    return result


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
            for arch in ARCHS:
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
    if args.json:
        print(json.dumps([asdict(r) | {"ok": r.ok} for r in results]))
    else:
        for r in results:
            status = "ok  " if r.ok else "FAIL"
            detail = r.error or f"{r.registers} regs, {r.spill_bytes} B spilled, loads {' '.join(r.load_kinds)}"
            print(f"{status} {r.family}.{r.kernel}[{r.label}] {r.arch}: {detail}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
