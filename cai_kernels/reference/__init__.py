"""The math of every op in plain PyTorch: ground truth for tests, baseline for benchmarks, fallback
when no compiled backend is present. One module and one function per op (``reference/<op>.py``),
written to read like the math (CleanRL style); nobody re-derives them.

Conventions of the log-prob ops (token_logprobs, linear_token_logprobs, choice_logprobs):
  * scores are computed in fp32 (fp64 when the input is fp64), whatever the input dtype;
  * ``temperature`` divides the logits before the softmax;
  * a position whose target equals ``ignore_index`` gets log-prob 0, entropy 0 and no gradient.

Conventions of the preference-model (PM) ops (pairwise_loss, last_token_rewards, reward_pairwise_loss,
ranked_pairwise_loss, reward_ranked_loss):
  * a reward is one scalar per sequence: the scalar head applied to the hidden state of the
    sequence's last real token, where "last" is the highest position whose mask is nonzero (right
    padding, left padding and masks with holes all work);
  * losses are computed in fp32 (fp64 when the rewards / hidden states are fp64), whatever the input dtype;
  * soft labels p = P(chosen is preferred) in [0, 1] (RL-CAI trains its PM on the feedback model's
    probabilities; p = 1 is the usual hard label); labels and margins are targets: no gradient flows
    into them;
  * -logsigmoid(d) = softplus(-d) is evaluated in a form that is exact for |d| up to the dtype's range
    (stacks that write ``log(sigmoid(d))`` return -inf once sigmoid underflows, d < -88 in fp32).

Conventions of the PPO ops (kl_penalty, gae, masked_whiten, ppo_advantages, ppo_policy_loss, ppo_value_loss):
  * tensors are (B, T): one row per sequence, one column per response position;
  * ``response_mask`` (B, T) is 1 (nonzero / True) on response tokens and 0 elsewhere: padding on
    either side, prompt or observation tokens between turns ("holes"); values at masked positions
    (even NaN or inf) never reach an unmasked output;
  * math in fp32 whatever the input dtype (fp64 for fp64 inputs), outputs in that dtype;
  * a mean over masked elements is 0 when there are none (never NaN).
"""

from .choice_logprobs import choice_logprobs, option_scores
from .gae import gae
from .kl_penalty import kl_penalty
from .last_token_rewards import last_token_index, last_token_rewards
from .linear_token_logprobs import linear_token_logprobs
from .masked_whiten import masked_whiten
from .pairwise_loss import pairwise_loss
from .ppo_advantages import ppo_advantages, shape_rewards
from .ppo_policy_loss import ppo_policy_loss
from .ppo_value_loss import ppo_value_loss
from .ranked_pairwise_loss import ranked_pairwise_loss
from .reward_pairwise_loss import reward_pairwise_loss
from .reward_ranked_loss import reward_ranked_loss
from .token_logprobs import token_logprobs

__all__ = ["choice_logprobs", "linear_token_logprobs", "option_scores", "token_logprobs", "pairwise_loss",
           "last_token_index", "last_token_rewards", "reward_pairwise_loss", "ranked_pairwise_loss",
           "reward_ranked_loss", "kl_penalty", "gae", "masked_whiten", "shape_rewards", "ppo_advantages",
           "ppo_policy_loss", "ppo_value_loss"]
