"""The RLHF stacks' own test files, run unpatched and with ``apply_to_*()`` (tests/test_peer_suites.py).

Where the files come from (the versions the Makefile installs, nothing else):
  OpenRLHF 0.11.2, veRL 0.9.1: their PyPI wheels ship a top-level ``tests`` package. ``make install``
      downloads the wheels, installs the packages into .venv/stacks and unpacks the tests with
      ``python tests/peer_suites.py unpack WHEEL_DIR PEER_DIR STACKS_DIR`` into
      .venv/peer-tests/<stack>/tests (never onto sys.path: it would shadow our ``tests``).
      OpenRLHF's tests load its modules from ``Path(__file__).parents[1] / "openrlhf"``, so a link to
      the installed package sits next to them.
  TRL 1.16.0: neither its wheel nor its sdist ships tests. Point ``CAI_PEER_TRL_TESTS`` at the
      ``tests`` folder of a TRL checkout (tag v1.16.0) to run them; without it that suite is skipped.

Each run is ``pytest -p cai_kernels.integrations.pytest_plugin --cai-patch {none|STACK}`` in a
subprocess, in the suite's folder, with its own empty ``pytest.ini`` (our pyproject's pytest
settings stay out), outcomes written as JSON by the plugin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

PEER_DIR_ENV = "CAI_PEER_TESTS_DIR"  # default: <venv>/peer-tests
TRL_TESTS_ENV = "CAI_PEER_TRL_TESTS"

# The test files that exercise what the adapters replace. Other files of the suites test what we do
# not touch (Ray workers, vLLM, datasets, checkpoints) and would only add time.
FILES = {
    "openrlhf": [
        "tests/test_kl_estimator_gradient.py",      # compute_approx_kl: estimators, clamps, unbiased gradient
        "tests/test_loss_aggregation.py",           # aggregate_loss, PolicyLoss (its module copy has ValueLoss & co.)
        "tests/test_actor_entropy_temperature.py",  # Actor -> compute_entropy / log_probs_from_logits
        "tests/test_reward_shaping.py",             # RemoteExperienceMaker: GAE, REINFORCE returns
        "tests/test_preference_eval.py",            # PairWiseLoss in the reward-model eval
        "tests/test_experience.py",
    ],
    "verl": [
        "tests/trainer/ppo/test_core_algos_on_cpu.py",            # GAE, kl_penalty, policy losses, registries
        "tests/trainer/ppo/test_loss_aggregation_on_cpu.py",      # agg_loss modes with the vanilla policy loss
        "tests/trainer/ppo/test_value_loss_normalization_on_cpu.py",  # compute_value_loss, global batch info
        "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py",
        "tests/trainer/ppo/test_reinforce_pp_multiturn_on_cpu.py",  # masked_whiten over multi-turn masks
        "tests/trainer/ppo/test_rollout_corr.py",                 # rollout_is_weights: our fallback path
        "tests/trainer/ppo/test_rollout_corr_integration.py",
    ],
    "trl": [
        "tests/test_utils.py",    # selective_log_softmax, entropy_from_logits, the chunked LM head
        "tests/test_kernels.py",  # trl.kernels (needs a GPU: skipped on CPU)
    ],
}

# Empty stand-ins for GPU-stack dependencies the files import but these tests never call (both runs).
STUBS = {"openrlhf": ["deepspeed"], "verl": [], "trl": []}

# An unpatched run that passes fewer tests than this collected or imported something wrongly.
MIN_PASSED = {"openrlhf": 70, "verl": 85, "trl": 1}

# Tests that pass unpatched and fail patched, by design: fnmatch pattern of the node id -> reason.
# README ("Drop-in adapters") lists them; tests/test_peer_suites.py fails on any other difference.
KNOWN_DIFFERENCES = {
    "openrlhf": {},
    "verl": {},
    "trl": {
        # parametrized dtype ids: float64, float32, float16 (dtype2), bfloat16 (dtype3)
        "tests/test_utils.py::TestSelectiveLogSoftmax::test_selective_log_softmax*[[]*dtype[23]]":
            "asserts bit-equality with torch.log_softmax in fp16 / bf16; ours is the exact value rounded once "
            "(<= 0.5 ulp), TRL's is up to ~1 ulp off: ~20 % of entries differ by 1 ulp",
        "tests/test_utils.py::TestEntropyFromLogits::test_entropy_from_logits_2_dims[[]dtype[23]-*]":
            "compares with an fp16 / bf16 entropy summed in half precision (rtol 1e-5); ours is summed in fp32 "
            "and rounded once: 1-3 ulp closer to the exact entropy",
    },
}


def peer_dir() -> Path:
    return Path(os.environ.get(PEER_DIR_ENV) or Path(sys.prefix) / "peer-tests")


@dataclass
class Suite:
    stack: str
    root: Path  # the folder holding tests/ (the subprocess runs there)
    files: list[str]
    version: str


def locate(stack: str, scratch: Path) -> Suite | str:
    """The suite's folder and files, or why it cannot run here."""
    if stack == "trl":
        source = os.environ.get(TRL_TESTS_ENV)
        if not source:
            return (f"TRL 1.16.0's wheel and sdist ship no tests: set {TRL_TESTS_ENV} to the tests/ folder of a "
                    "TRL checkout (tag v1.16.0) to run them")
        # copy tests/ alone: a checkout's trl/ next to it would shadow the installed TRL
        root = scratch / "trl"
        shutil.copytree(source, root / "tests", dirs_exist_ok=True)
        import trl

        version = f"trl {trl.__version__} installed, tests from {source}"
    else:
        root = peer_dir() / stack
        if not (root / "tests").is_dir():
            return f"{root / 'tests'} is missing: `make install` unpacks the {stack} wheel's tests there"
        version = (root / "VERSION").read_text().strip() if (root / "VERSION").exists() else stack
    files = [f for f in FILES[stack] if (root / f).exists()]
    if not files:
        return f"none of {FILES[stack]} under {root}"
    return Suite(stack, root, files, version)


def run(suite: Suite, patch: bool, out_dir: Path, timeout: float = 600) -> dict:
    """One pytest run of the suite (patched or not) in a subprocess; the plugin's JSON plus the tail of the log."""
    import cai_kernels

    out_dir.mkdir(parents=True, exist_ok=True)
    mode = suite.stack if patch else "none"
    outcomes = out_dir / f"{suite.stack}-{mode}.json"
    ini = out_dir / "pytest.ini"
    ini.write_text("[pytest]\n")
    env = dict(os.environ)
    # the subprocess imports this cai_kernels (worktree or install), and never reaches the network
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cai_kernels.__file__).parents[1])]
                                        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    command = [sys.executable, "-m", "pytest", *suite.files, "-c", str(ini), "--rootdir", str(suite.root),
               "-p", "cai_kernels.integrations.pytest_plugin", "--cai-patch", mode, "--cai-outcomes", str(outcomes),
               "-p", "no:cacheprovider", "-q", "--continue-on-collection-errors"]
    for name in STUBS[suite.stack]:
        command += ["--cai-stub-missing", name]
    proc = subprocess.run(command, cwd=suite.root, env=env, capture_output=True, text=True, timeout=timeout)
    if not outcomes.exists():
        raise RuntimeError(f"pytest wrote no outcomes (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    result = json.loads(outcomes.read_text())
    result["log_tail"] = proc.stdout[-4000:]
    return result


def counts(outcomes: dict[str, str]) -> dict[str, int]:
    keys = ("passed", "failed", "skipped", "error")
    return {k: sum(1 for o in outcomes.values() if o == k) for k in keys}


def known_reason(stack: str, nodeid: str) -> str | None:
    return next((why for pattern, why in KNOWN_DIFFERENCES[stack].items() if fnmatch(nodeid, pattern)), None)


def unpack(wheel_dir: Path, peer: Path, stacks_dir: Path) -> None:
    """Extract the ``tests`` package of the OpenRLHF and veRL wheels in ``wheel_dir`` into peer/<stack>/tests."""
    for stack in ("openrlhf", "verl"):
        wheels = sorted(wheel_dir.glob(f"{stack}-*.whl"))
        if not wheels:
            raise SystemExit(f"no {stack} wheel in {wheel_dir}")
        wheel = wheels[-1]
        target = peer / stack
        shutil.rmtree(target, ignore_errors=True)
        (target / "tests").mkdir(parents=True)
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                parts = member.split("/")
                if len(parts) > 2 and parts[0].endswith(".data") and parts[1] in ("purelib", "platlib"):
                    parts = parts[2:]  # <dist>.data/purelib/tests/... is installed as tests/...
                if parts[0] != "tests" or member.endswith("/"):
                    continue
                path = target.joinpath(*parts)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(member))
        package = stacks_dir.resolve() / stack
        (target / stack).symlink_to(os.path.relpath(package, target), target_is_directory=True)
        (target / "VERSION").write_text(wheel.name + "\n")
        print(f"{wheel.name}: {sum(1 for _ in (target / 'tests').rglob('*.py'))} test files -> {target / 'tests'}")


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "unpack":
        raise SystemExit("usage: python tests/peer_suites.py unpack WHEEL_DIR PEER_DIR STACKS_DIR")
    unpack(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
