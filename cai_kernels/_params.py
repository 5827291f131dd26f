"""What each op's kernels are told besides tensors: one typed bundle per op, and the enums they share.

An op's public function checks its arguments and builds its bundle once; the bundle then travels as
it is to the Triton launcher (``cai_kernels/triton/<op>.py``), and field by field, in declaration
order, through the op's custom ops (their schemas are written from the fields by ``schema()``) to the
C++ kernel (``csrc/cpu/<op>.cpp``, whose ``m.def`` schema names the same fields in the same order:
``tests/test_registry.py`` checks that). Enums are IntEnums: schemas and kernels see their ints, and
``csrc/cpu`` mirrors each one in a C++ enum that names this file.
"""

from __future__ import annotations

import enum
import sys
import typing

# ---- enums and constants of the ops' definitions ---------------------------------------------------


class Reduction(enum.IntEnum):
    """How a per-pair loss is reduced (pairwise_loss). C++: ``Reduction`` in csrc/cpu/pairwise_loss.cpp."""

    NONE = 0
    SUM = 1
    MEAN = 2


REDUCTIONS = {"none": Reduction.NONE, "sum": Reduction.SUM, "mean": Reduction.MEAN}


class Agg(enum.IntEnum):
    """How the PPO losses reduce per-token losses over response tokens. C++: ``Agg`` in csrc/cpu/clipped_loss.h."""

    TOKEN_MEAN = 0
    SEQ_MEAN_TOKEN_MEAN = 1
    SEQ_MEAN_TOKEN_SUM = 2


AGG_MODES = {"token-mean": Agg.TOKEN_MEAN, "seq-mean-token-mean": Agg.SEQ_MEAN_TOKEN_MEAN,
             "seq-mean-token-sum": Agg.SEQ_MEAN_TOKEN_SUM}


class KlEstimator(enum.IntEnum):
    """Schulman's per-token KL estimators. C++: ``KlEstimator`` in csrc/cpu/kl_math.h."""

    K1 = 0
    K2 = 1
    K3 = 2
    ABS = 3


# The names users pass; "low_var_kl" is k3 with veRL's clamps (below).
ESTIMATORS = {"k1": KlEstimator.K1, "k2": KlEstimator.K2, "k3": KlEstimator.K3, "abs": KlEstimator.ABS,
              "low_var_kl": KlEstimator.K3}
# veRL's "low_var_kl": k3 with the log-ratio clamped to +-20 and the estimate clamped to +-10.
LOW_VAR_KL_CLAMP = (-20.0, 20.0)
LOW_VAR_KL_OUTPUT_CLAMP = (-10.0, 10.0)
# log(pi / pi_old) is clamped to this range before exp() in the policy loss (as veRL does): the ratio
# stays within [2e-9, 4.9e8], so no inf, and no NaN from inf * 0. C++: kLogRatioLimit (ppo_policy_loss.cpp).
LOG_RATIO_LIMIT = 20.0
# Stands for "no bound" in the KL clamps: finite, so that compiled graphs never hold an inf literal, and
# beyond every float (it rounds to inf in fp32; the Triton launchers pass it as inf).
NO_BOUND = sys.float_info.max


# ---- the bundles ---------------------------------------------------------------------------------
# Each bundle is a typed NamedTuple: immutable, its fields named and typed once, and already the flat
# tuple the custom-op schemas and the C++ kernels take (``*params``), so carrying it costs nothing per
# call (a frozen dataclass costs ~1 us to flatten and rebuild on this CPU; these ops aim at ~10 us a call).
# The custom ops hand enum fields back as plain ints; an IntEnum compares equal to its int.

_SCHEMA_TYPES = {float: "float", int: "int", bool: "bool", str: "str"}


def _schema_type(annotation) -> str:
    if isinstance(annotation, type) and issubclass(annotation, enum.IntEnum):
        return "int"
    if annotation in _SCHEMA_TYPES:
        return _SCHEMA_TYPES[annotation]
    options = typing.get_args(annotation)
    if len(options) == 2 and type(None) in options:  # X | None
        inner = next(o for o in options if o is not type(None))
        return _schema_type(inner) + "?"
    raise TypeError(f"no custom-op schema type for {annotation!r}")


def schema(bundle: type) -> str:
    """The bundle's fields as custom-op schema arguments, e.g. ``"float gamma, float lam"``."""
    hints = typing.get_type_hints(bundle)
    return ", ".join(f"{_schema_type(hints[name])} {name}" for name in bundle._fields)


def kernel_params(cls):
    """Checks that every field of a bundle (a typing.NamedTuple class) has a custom-op schema type."""
    schema(cls)
    return cls


@kernel_params
class TokenLogprobsParams(typing.NamedTuple):
    """token_logprobs: scores are softmax(logits / temperature); rows whose target equals ``ignore_index``
    (when not None) score 0; ``with_entropy``: also the entropy (the backward: a gradient flows into it)."""

    temperature: float
    ignore_index: int | None
    with_entropy: bool


@kernel_params
class LinearTokenLogprobsParams(typing.NamedTuple):
    """linear_token_logprobs: as token_logprobs, plus the blocking of the fused LM head: the vocabulary in
    blocks of ``vocab_block`` rows of the weight, the tokens in chunks of ``token_chunk`` rows of hidden."""

    temperature: float
    ignore_index: int | None
    with_entropy: bool
    vocab_block: int
    token_chunk: int


@kernel_params
class ChoiceLogprobsParams(typing.NamedTuple):
    """choice_logprobs' option step (``option_scores``): the normalized probabilities are clamped to
    [clamp_lo, clamp_hi], both None for no clamp. Its log-prob step takes the token_logprobs /
    linear_token_logprobs bundle."""

    clamp_lo: float | None
    clamp_hi: float | None


@kernel_params
class PairwiseLossParams(typing.NamedTuple):
    """pairwise_loss: ``label_value`` / ``margin_value`` are every pair's soft label / margin when the op
    gets no per-pair labels / margin tensor (an empty one); the loss is reduced by ``reduction``."""

    label_value: float
    margin_value: float
    reduction: Reduction


@kernel_params
class RankedPairwiseLossParams(typing.NamedTuple):
    """ranked_pairwise_loss's reduced form (the Triton kernels; the C++ kernels return per-row losses, reduced in
    PyTorch): the per-row losses summed, or (MEAN) averaged over the rows with at least one pair."""

    reduction: Reduction


@kernel_params
class LastTokenRewardsParams(typing.NamedTuple):
    """last_token_rewards: the caller's name of the mask, for the error raised when a sequence has no real token."""

    mask_name: str


@kernel_params
class KlPenaltyParams(typing.NamedTuple):
    """kl_penalty: r = logprobs - ref_logprobs clamped to [clamp_lo, clamp_hi], the estimate then clamped
    to [output_clamp_lo, output_clamp_hi]; -NO_BOUND / NO_BOUND: no bound."""

    estimator: KlEstimator
    clamp_lo: float
    clamp_hi: float
    output_clamp_lo: float
    output_clamp_hi: float


@kernel_params
class GaeParams(typing.NamedTuple):
    """gae: the discount ``gamma`` and GAE's ``lam``, both in [0, 1]."""

    gamma: float
    lam: float


@kernel_params
class MaskedWhitenParams(typing.NamedTuple):
    """masked_whiten: ``shift_mean`` False adds the mean back; ``unbiased`` variance (n - 1); ``eps`` > 0."""

    shift_mean: bool
    unbiased: bool
    eps: float


@kernel_params
class PpoAdvantagesParams(typing.NamedTuple):
    """ppo_advantages: the KL estimate and its clamps as in KlPenaltyParams, the shaped rewards
    -kl_coef * kl (+ the score at the last response token), GAE with gamma / lam, whitening if ``whiten``."""

    kl_coef: float
    gamma: float
    lam: float
    estimator: KlEstimator
    clamp_lo: float
    clamp_hi: float
    output_clamp_lo: float
    output_clamp_hi: float
    whiten: bool


@kernel_params
class PpoPolicyLossParams(typing.NamedTuple):
    """ppo_policy_loss: the ratio is clipped to [1 - clip_low, 1 + clip_high]; ``dual_clip`` (> 1) bounds the
    loss of negative advantages, None for none; ``agg`` reduces over response tokens (the backward takes
    its per-row weights from the forward and ignores ``agg``)."""

    clip_low: float
    clip_high: float
    dual_clip: float | None
    agg: Agg


@kernel_params
class PpoValueLossParams(typing.NamedTuple):
    """ppo_value_loss: values are clipped to old_values +- ``clip`` (None: no clipping); ``agg`` as in
    PpoPolicyLossParams."""

    clip: float | None
    agg: Agg
