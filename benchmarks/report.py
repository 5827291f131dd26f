"""Turns a pytest-benchmark JSON of this suite into a markdown report and PNG plots.

    python -m benchmarks.report benchmarks/results/<machine>-<date>.json [--readme README.md]
    python -m benchmarks.report --name        # prints <machine>-<date>, the results file stem

Writes, beside the JSON: ``<stem>.md`` (machine, the claims of the kernel issues and whether each
holds, then per op and shape every variant's time, speed-up vs the reference and vs torch.compile of
the reference, GB/s and % of the read bandwidth measured in the same run, TFLOP/s and % of the plain
matmul, peak extra memory; skipped variants with their reasons) and ``<stem>-*.png`` (time and memory
vs tokens per variant). ``--readme`` rewrites the README's Benchmarks section for this device kind.

Times are each benchmark's *min* over its rounds; a speed-up is t(reference) / t(variant), so 3.0x
means three times faster. All numbers of one table come from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

KIND_ORDER = {"ours": 0, "reference": 1, "compiled": 2, "peer": 3, "baseline": 4}


# -- reading ----------------------------------------------------------------------------------------------

@dataclass
class Row:
    group: str
    op: str
    mode: str
    case: dict
    variant: str
    kind: str
    x_name: str
    x: float
    min_s: float
    median_s: float
    rounds: int
    info: dict


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def merge(parts: list[dict]) -> dict:
    """One run split in parts (the GPU script's 10-minute pieces): the first part's machine info, all
    benchmarks and skips."""
    merged = dict(parts[0])
    merged["benchmarks"] = [b for p in parts for b in p.get("benchmarks", [])]
    merged["skipped"] = [s for p in parts for s in p.get("skipped", [])]
    merged["parts"] = [p.get("datetime") for p in parts]
    return merged


def rows(data: dict) -> list[Row]:
    out = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "op" not in info:
            continue
        stats = bench["stats"]
        out.append(Row(group=bench.get("group") or info["op"], op=info["op"], mode=info.get("mode", ""),
                       case=info.get("case", {}), variant=info["variant"], kind=info.get("kind", "peer"),
                       x_name=info.get("x_name", ""), x=info.get("x", 0), min_s=stats["min"],
                       median_s=stats["median"], rounds=stats["rounds"], info=info))
    return out


def by_group(all_rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in all_rows:
        groups[row.group].append(row)
    for members in groups.values():
        members.sort(key=lambda r: (KIND_ORDER.get(r.kind, 9), r.variant))
    return dict(groups)


def _first(members: list[Row], kind: str) -> Row | None:
    return next((r for r in members if r.kind == kind), None)


def best_ours(members: list[Row]) -> Row | None:
    candidates = [r for r in members if r.kind == "ours"]
    return min(candidates, key=lambda r: r.min_s) if candidates else None


# -- the claims of the kernel issues ------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """A claim of a kernel issue: a number computed from one group of one run, and its threshold."""

    text: str
    op: str
    mode: str
    case: dict
    metric: Callable[[list[Row]], float | None]
    fmt: str
    holds: Callable[[float], bool]


def _speedup_vs(kind: str, variant: str | None = None):
    def metric(members):
        ours, other = best_ours(members), (next((r for r in members if r.variant == variant), None)
                                          if variant else _first(members, kind))
        return other.min_s / ours.min_s if ours and other else None
    return metric


def _ours_info(key: str, scale: float = 1.0):
    def metric(members):
        ours = best_ours(members)
        return ours.info[key] * scale if ours and key in ours.info else None
    return metric


def _time_ratio_vs_reference(members):
    ours, ref = best_ours(members), _first(members, "reference")
    return ours.min_s / ref.min_s if ours and ref else None


CPU_CLAIMS = [
    Claim("token_logprobs fwd [4096, 49152] fp32 >= 2x torch.compile", "token_logprobs", "fwd",
          {"tokens": 4096, "vocab": 49152, "dtype": "float32"}, _speedup_vs("compiled"), "{:.2f}x", lambda v: v >= 2),
    Claim("token_logprobs fwd [4096, 49152] fp32 >= 6x eager", "token_logprobs", "fwd",
          {"tokens": 4096, "vocab": 49152, "dtype": "float32"}, _speedup_vs("reference"), "{:.2f}x", lambda v: v >= 6),
    Claim("token_logprobs fwd [2048, 49152] bf16 >= 2x torch.compile", "token_logprobs", "fwd",
          {"tokens": 2048, "vocab": 49152, "dtype": "bfloat16"}, _speedup_vs("compiled"), "{:.2f}x",
          lambda v: v >= 2),
    Claim("token_logprobs fwd+bwd [4096, 49152] fp32 >= 1.5x torch.compile fwd+bwd", "token_logprobs", "fwd+bwd",
          {"tokens": 4096, "vocab": 49152, "dtype": "float32"}, _speedup_vs("compiled"), "{:.2f}x",
          lambda v: v >= 1.5),
    Claim("token_logprobs fwd+bwd [2048, 49152] bf16 >= 1.5x torch.compile fwd+bwd", "token_logprobs", "fwd+bwd",
          {"tokens": 2048, "vocab": 49152, "dtype": "bfloat16"}, _speedup_vs("compiled"), "{:.2f}x",
          lambda v: v >= 1.5),
    Claim("token_logprobs fwd [4096, 49152] fp32 >= 65 % of read bandwidth", "token_logprobs", "fwd",
          {"tokens": 4096, "vocab": 49152, "dtype": "float32"}, _ours_info("bw_fraction", 100), "{:.0f} %",
          lambda v: v >= 65),
    Claim("linear_token_logprobs fwd+bwd [2048, 576]x[49152, 576] <= 1.25x eager time", "linear_token_logprobs",
          "fwd+bwd", {"tokens": 2048, "hidden": 576, "vocab": 49152, "dtype": "float32"}, _time_ratio_vs_reference,
          "{:.2f}x", lambda v: v <= 1.25),
    Claim("linear_token_logprobs fwd+bwd [2048, 576]x[49152, 576] <= 40 MB extra memory", "linear_token_logprobs",
          "fwd+bwd", {"tokens": 2048, "hidden": 576, "vocab": 49152, "dtype": "float32"}, _ours_info("peak_extra_mb"),
          "{:.1f} MB", lambda v: v <= 40),
    Claim("gae [256, 1024] >= 50x the Python loop (OpenRLHF / veRL)", "gae", "fwd", {"batch": 256, "length": 1024},
          _speedup_vs("peer", "python GAE loop (openrlhf/verl)"), "{:.0f}x", lambda v: v >= 50),
    Claim("ppo_advantages [256, 1024] >= 1.5x the composition of the single ops (kl_penalty, shaping, gae, "
          "masked_whiten)", "ppo_advantages", "fwd", {"batch": 256, "length": 1024},
          _speedup_vs("baseline", "composition of cai_kernels ops"), "{:.2f}x", lambda v: v >= 1.5),
    Claim("ppo_advantages [256, 1024] vs the reference (Python GAE loop inside) >= 1.5x", "ppo_advantages", "fwd",
          {"batch": 256, "length": 1024}, _speedup_vs("reference"), "{:.0f}x", lambda v: v >= 1.5),
]


def _matches(row: Row, op: str, mode: str, case: dict) -> bool:
    return row.op == op and row.mode == mode and all(row.case.get(k) == v for k, v in case.items())


def evaluate_claims(groups: dict[str, list[Row]], claims: list[Claim]) -> list[tuple[Claim, str, str]]:
    """(claim, measured, verdict) for each claim; 'not measured' when the group is absent from the run."""
    out = []
    for claim in claims:
        members = next((m for m in groups.values() if m and _matches(m[0], claim.op, claim.mode, claim.case)), None)
        value = claim.metric(members) if members else None
        if value is None:
            out.append((claim, "not measured", "n/a"))
        else:
            out.append((claim, claim.fmt.format(value), "yes" if claim.holds(value) else "**no**"))
    return out


# -- markdown ---------------------------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _x(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


def _num(info: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    return fmt.format(info[key] * scale) if key in info and info[key] is not None else ""


def group_table(members: list[Row]) -> list[str]:
    ref, compiled = _first(members, "reference"), _first(members, "compiled")
    has_bw = any("gbps" in r.info for r in members)
    has_flops = any("tflops" in r.info for r in members)
    has_mem = any("peak_extra_mb" in r.info for r in members)
    header = ["variant", "min ms", "median ms", "vs reference", "vs torch.compile"]
    header += ["GB/s", "% read BW"] if has_bw else []
    header += ["TFLOP/s", "% of matmul"] if has_flops else []
    header += ["peak extra MB"] if has_mem else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in members:
        name = f"**{r.variant}**" if r.kind == "ours" else r.variant
        cells = [name, _ms(r.min_s), _ms(r.median_s), _x(ref.min_s / r.min_s) if ref else "",
                 _x(compiled.min_s / r.min_s) if compiled else ""]
        if has_bw:
            cells += [_num(r.info, "gbps", "{:.1f}"), _num(r.info, "bw_fraction", "{:.0f}", 100)]
        if has_flops:
            cells += [_num(r.info, "tflops", "{:.3f}"), _num(r.info, "matmul_fraction", "{:.0f}", 100)]
        if has_mem:
            cells += [_num(r.info, "peak_extra_mb", "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pipeline_table(members: list[Row]) -> list[str]:
    """End-to-end rows: seconds, and questions/s where the row scored questions."""
    scoring = any("questions_per_s" in r.info for r in members)
    header = ["step", "seconds"] + (["questions/s", "accuracy", "max |p - p_other scorer|"] if scoring else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(members, key=lambda r: r.x if r.x_name == "stage" else -r.min_s):
        cells = [r.variant, f"{r.min_s:.1f}"]
        if scoring:
            cells += [_num(r.info, "questions_per_s", "{:.2f}"), _num(r.info, "accuracy", "{:.3f}"),
                      _num(r.info, "max_prob_difference_vs_other_scorer", "{:.1e}")]
        lines.append("| " + " | ".join(cells) + " |")
    if not scoring:
        lines.append(f"| **total** | {sum(r.min_s for r in members):.1f} |")
    return lines


def _is_pipeline(members: list[Row]) -> bool:
    return all(r.kind == "pipeline" for r in members)


def machine_lines(machine: dict) -> list[str]:
    flags = machine.get("cpu_flags", {})
    bandwidth = machine.get("read_bandwidth", {})
    lines = [f"- CPU: {machine.get('cpu_model', '?')}, {machine.get('cpu_cores', '?')} cores, "
             f"AVX2 {'yes' if flags.get('avx2') else 'no'}, AVX-512 {'yes' if flags.get('avx512f') else 'no'}; "
             f"torch reports capability {machine.get('torch_cpu_capability', '?')}, "
             f"{machine.get('torch_threads', '?')} threads"]
    if machine.get("gpu"):
        lines.append(f"- GPU: {machine['gpu']} ({machine.get('gpu_memory_gib')} GiB, "
                     f"sm_{str(machine.get('gpu_capability', '')).replace('.', '')}), CUDA {machine.get('cuda')}")
    lines.append(f"- torch {machine.get('torch')}, {machine.get('triton')}, python {machine.get('python')}")
    lines.append(f"- cai_kernels CPU extension: {machine.get('cai_kernels_cpu_extension', '?')}")
    if bandwidth:
        lines.append(f"- read bandwidth (this run, {bandwidth.get('how', '')}): {bandwidth['gbps']:.1f} GB/s")
    if machine.get("load_average"):
        start = machine.get("load_average_start")
        lines.append("- load average (1, 5, 15 min)"
                     + (f" when the run started: {', '.join(f'{v:.2f}' for v in start)};" if start else "")
                     + " when it ended: " + ", ".join(f"{v:.2f}" for v in machine["load_average"]))
    return lines


def claims_table(evaluated) -> list[str]:
    lines = ["| claim | measured | holds |", "|---|---|---|"]
    lines += [f"| {c.text} | {value} | {verdict} |" for c, value, verdict in evaluated]
    return lines


def skipped_lines(data: dict) -> list[str]:
    reasons: dict[str, list[str]] = defaultdict(list)
    for item in data.get("skipped", []):
        match = re.search(r"\[(.*)\]$", item["test"])
        reasons[item["reason"]].append(match.group(1) if match else item["test"])
    return [f"- {reason} ({len(tests)} benchmark{'s' if len(tests) > 1 else ''})"
            for reason, tests in sorted(reasons.items())]


def markdown(data: dict, *, plots: list[str], title: str) -> str:
    groups = by_group(rows(data))
    machine = data.get("machine_info", {})
    lines = [f"# {title}", "", *machine_lines(machine), f"- date: {data.get('datetime', machine.get('date', ''))}",
             "", "Time: the min over each benchmark's rounds (first call, with compilation, excluded). "
             "\"vs reference\" / \"vs torch.compile\": t(reference) / t(variant), higher is faster. "
             "GB/s: the fewest bytes the op must move over its time; % read BW: of the torch.sum bandwidth above. "
             "Above 100 % the inputs were cache-resident (small PPO / PM tensors). "
             "Peak extra MB: resident memory above the inputs during the call, and for fwd+bwd above the "
             "gradients themselves (CPU: peak RSS delta of the 2nd call in a fresh process per variant; GPU: "
             "torch.cuda.max_memory_allocated). Compile: torch.compile of the reference, static shapes, "
             "compilation excluded.", ""]
    if machine.get("device", "cpu") == "cpu":
        lines += ["## Claims of the kernel issues (this CPU)", "", *claims_table(evaluate_claims(groups, CPU_CLAIMS)),
                  ""]
    by_op: dict[str, list[str]] = defaultdict(list)
    for name, members in groups.items():
        by_op[members[0].op].append(name)
    for op, names in by_op.items():
        if _is_pipeline(groups[names[0]]):
            for name in names:
                lines += [f"## {name}", "", *pipeline_table(groups[name]), ""]
            continue
        lines += [f"## {op}", ""]
        for name in sorted(names, key=lambda n: (groups[n][0].mode, groups[n][0].case.get("dtype", ""),
                                                  groups[n][0].x, n)):
            lines += [f"### {name}", "", *group_table(groups[name]), ""]
    extra = skipped_lines(data)
    if extra:
        lines += ["## Not run here", "", *extra, ""]
    if plots:
        lines += ["## Plots", "", *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots], ""]
    return "\n".join(lines)


def summary_table(groups: dict[str, list[Row]]) -> list[str]:
    """One line per op and shape: ours vs the reference and torch.compile (the README table)."""
    lines = ["| op | case | ours ms | reference ms | compile ms | vs reference | vs torch.compile | GB/s (% BW) "
             "| peak extra MB (ours / reference) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, members in groups.items():
        ours, ref, compiled = best_ours(members), _first(members, "reference"), _first(members, "compiled")
        if not ours:
            continue
        bw = (f"{ours.info['gbps']:.1f} ({ours.info['bw_fraction'] * 100:.0f} %)" if "gbps" in ours.info else "")
        mem = (f"{_num(ours.info, 'peak_extra_mb', '{:.1f}')} / {_num(ref.info, 'peak_extra_mb', '{:.1f}')}"
               if ref and "peak_extra_mb" in ours.info else "")
        case = name.removeprefix(ours.op).strip()
        lines.append(f"| {ours.op} | {case} | {_ms(ours.min_s)} | {_ms(ref.min_s) if ref else ''} | "
                     f"{_ms(compiled.min_s) if compiled else ''} | {_x(ref.min_s / ours.min_s) if ref else ''} | "
                     f"{_x(compiled.min_s / ours.min_s) if compiled else ''} | {bw} | {mem} |")
    return lines


# -- plots ------------------------------------------------------------------------------------------------

def series(groups: dict[str, list[Row]]) -> dict[tuple, dict[str, list[tuple[float, Row]]]]:
    """Sweeps: rows of one op / mode / dtype whose case differs only in the x axis, per variant."""
    sweeps: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for members in groups.values():
        for r in members:
            fixed = tuple(sorted((k, v) for k, v in r.case.items() if k not in (r.x_name, "mode")))
            sweeps[(r.op, r.mode, r.x_name, fixed)][r.variant].append((r.x, r))
    return {k: v for k, v in sweeps.items() if len({x for pts in v.values() for x, _ in pts}) >= 2}


def plot(groups: dict[str, list[Row]], out_prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (op, mode, x_name, fixed), per_variant in sorted(series(groups).items()):
        label = ", ".join(f"{k}={v}" for k, v in fixed)
        slug = re.sub(r"[^a-z0-9]+", "-", f"{op}-{mode}-{label}".lower()).strip("-")
        for what, key, unit in (("time", None, "ms"), ("memory", "peak_extra_mb", "MB")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            drawn = 0
            for variant, points in sorted(per_variant.items()):
                points = sorted(points, key=lambda p: p[0])
                ys = [(p[1].min_s * 1e3 if key is None else p[1].info.get(key)) for p in points]
                xs = [p[0] for p, y in zip(points, ys) if y is not None]
                ys = [y for y in ys if y is not None]
                if len(xs) < 2:
                    continue
                style = "-o" if points[0][1].kind == "ours" else "--." if points[0][1].kind == "peer" else "-."
                ax.plot(xs, [max(y, 1e-3) for y in ys], style, label=variant)
                drawn += 1
            if not drawn:
                plt.close(fig)
                continue
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x_name)
            ax.set_ylabel(f"{what} ({unit})" if key is None else f"peak extra memory ({unit})")
            ax.set_title(f"{op} {mode} ({label})", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = f"{out_prefix}-{what}-{slug}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


# -- README -------------------------------------------------------------------------------------------------

def readme_section(data: dict, *, md_path: str, plots: list[str], readme_dir: str) -> str:
    groups = by_group(rows(data))
    machine = data.get("machine_info", {})
    kind = "GPU" if machine.get("gpu") else "CPU"
    rel = os.path.relpath(md_path, readme_dir)
    what = machine.get("gpu") if kind == "GPU" else f"{machine.get('cpu_model')}, {machine.get('cpu_cores')} cores"
    lines = [f"### {kind}: {what} ({machine.get('date', '')})", "", *machine_lines(machine), "",
             f"Full tables, skipped peers and plots: [{os.path.basename(md_path)}]({rel}).", ""]
    if kind == "CPU":
        lines += [*claims_table(evaluate_claims(groups, CPU_CLAIMS)), ""]
    lines += [*summary_table(groups), ""]
    for name, members in groups.items():
        if _is_pipeline(members):
            lines += [f"{name}:", "", *pipeline_table(members), ""]
    headline = [p for p in plots if "-token-logprobs-fwd-dtype-float32" in p] or plots[:2]
    for p in headline[:2]:
        lines.append(f"![{os.path.basename(p)}]({os.path.relpath(p, readme_dir)})")
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: str, kind: str, section: str) -> None:
    """Replace (or add) the block between the ``bench:<kind>`` markers inside the Benchmarks section."""
    start, end = f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->"
    with open(readme) as f:
        text = f.read()
    block = f"{start}\n{section}{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        if "## Benchmarks" not in text:
            text = text.rstrip() + "\n\n## Benchmarks\n\n" + BENCH_INTRO + "\n"
        head, _, tail = text.partition("## Benchmarks")
        next_section = tail.find("\n## ", 1)
        body, rest = (tail, "") if next_section < 0 else (tail[:next_section], tail[next_section:])
        text = head + "## Benchmarks" + body.rstrip() + "\n\n" + block + "\n" + rest
    with open(readme, "w") as f:
        f.write(text)


BENCH_INTRO = """`make bench` (about 15 minutes on 2 cores) runs the pytest-benchmark suite in `benchmarks/`: every op
against its reference (`cai_kernels.reference`), `torch.compile` of the reference, and the peers users
would pick instead (TRL's `selective_log_softmax`, the veRL / OpenRLHF per-row and GAE loops; on GPU
Liger-Kernel, Cut Cross-Entropy, flash-attn). It writes `benchmarks/results/<machine>-<date>.json`,
the full markdown tables and plots beside it, and the tables below. `make bench-quick` is the
3-minute subset; `make bench-gpu` runs the suite on a GPU machine (`benchmarks/gpu.sh`)."""


# -- entry point -------------------------------------------------------------------------------------------

def results_name() -> str:
    import datetime

    from ._machine import slug

    return f"{slug()}-{datetime.date.today().isoformat()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="*", help="pytest-benchmark JSON written with --benchmark-json (several: "
                        "parts of one run, merged with --merge-into)")
    parser.add_argument("--merge-into", help="write the merged parts to this JSON and report on it")
    parser.add_argument("--name", action="store_true", help="print <machine>-<date> and exit")
    parser.add_argument("--readme", help="README.md whose Benchmarks section to update")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.name:
        print(results_name())
        return 0
    if not args.json:
        parser.error("the results JSON is required")
    if len(args.json) > 1 and not args.merge_into:
        parser.error("several JSON files need --merge-into")
    if args.merge_into:
        data = merge([load(p) for p in args.json])
        with open(args.merge_into, "w") as f:
            json.dump(data, f, indent=1)
        path = args.merge_into
    else:
        data, path = load(args.json[0]), args.json[0]
    stem = os.path.splitext(path)[0]
    groups = by_group(rows(data))
    plots = [] if args.no_plots else plot(groups, stem)
    machine = data.get("machine_info", {})
    title = f"Benchmarks: {machine.get('gpu') or machine.get('cpu_model', 'unknown')} ({machine.get('date', '')})"
    md_path = stem + ".md"
    with open(md_path, "w") as f:
        f.write(markdown(data, plots=plots, title=title))
    print(f"wrote {md_path} and {len(plots)} plots")
    print("\n".join(summary_table(groups)))
    if machine.get("device", "cpu") == "cpu":
        print("\n".join(claims_table(evaluate_claims(groups, CPU_CLAIMS))))
    if args.readme:
        kind = "gpu" if machine.get("gpu") else "cpu"
        update_readme(args.readme, kind, readme_section(data, md_path=md_path, plots=plots,
                                                        readme_dir=os.path.dirname(os.path.abspath(args.readme))))
        print(f"updated the {kind.upper()} part of the Benchmarks section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
