"""An lm-evaluation-harness model backend: lm-eval's `hf` model, scored with cai's batched continuation scorer.

    cai eval harness --model cai --model_args pretrained=embedded,batch_size=8 --tasks ...   (lm-eval's own CLI)
    lm_eval.simple_evaluate(model="cai", model_args="pretrained=embedded", tasks=[...])      (after `import cai.harness`)

`CaiLM` subclasses lm-eval's `HFLM`, so loading, tokenization (lm-eval's `_encode_pair`, left truncation to
`max_length`), chat templates, `loglikelihood_rolling`'s windows and `generate_until` are lm-eval's own code.
Only `_loglikelihood_tokens` differs. lm-eval's hf runs one forward of context + continuation per request and a
log-softmax over the whole vocabulary at every position; here (cai.continuations.score_continuations):
  - requests are grouped by context, a task's contexts go into a prefix tree, and every shared prefix (few-shot
    examples, an instruction, a question asked with several answer lists) is encoded once;
  - a context's continuations ride in its forward (tree attention); the LM head is applied only at
    continuation tokens, through `cai_kernels.choice_logprobs` (no (tokens, vocab) tensor beyond those), and
    `is_greedy` is the argmax at those positions only (skipped for `loglikelihood_rolling`, which drops it).
The fed token sequence of every request is exactly lm-eval's, so the log-likelihoods agree to float rounding.
A model whose logits are not `lm_head(last hidden state)` (logit soft-capping, scaling) or whose cache cannot be
re-used is detected on first use by a probe; it is then scored by lm-eval's own code, with a warning.

lm-eval 0.4.x has no plugin discovery: importing this module registers the model name "cai"
(`cai eval harness` does it before it hands its arguments to lm-eval's CLI).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import lm_eval.models  # noqa: F401  registers lm-eval's own models, which get_model skips once ours is there

from .continuations import score_continuations
from .models import ModelNotFoundError, lm_head, resolve_model

logger = logging.getLogger(__name__)
MODEL_NAME = "cai"
# names of config attributes that change logits after the LM head; the probe catches others
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@register_model(MODEL_NAME)
class CaiLM(HFLM):
    """lm-eval's HFLM with loglikelihood requests scored by `cai.continuations.score_continuations`.

    Takes HFLM's arguments; besides: `pretrained="embedded"` is the embedded SmolLM2-135M-Instruct,
    `device=None` picks cuda when available, else cpu, and `share_prefixes=False` encodes every context whole
    (no prefix tree). `batch_size` is the number of rows per forward, as HFLM's is requests: a row holds a tree
    node (a context's tokens beyond its parent's) with the continuations that end there, or several sibling nodes
    packed up to `score_continuations`' pack_tokens (256 tokens).
    """

    def __init__(self, pretrained="embedded", device: str | None = None, share_prefixes: bool = True, **kwargs):
        if isinstance(pretrained, str):
            pretrained = resolve_model(pretrained)
            if pretrained.startswith(("/", "./", "../", "~")) and not Path(pretrained).expanduser().exists():
                raise ModelNotFoundError(f"pretrained={pretrained!r}: no such folder on this machine")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, device=device, **kwargs)
        self.share_prefixes = share_prefixes in (True, "True", "true", "1")
        self._with_greedy = True
        self._fallback_reason: str | None = None
        self._probed = False

    # -- lm-eval entry points ---------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """Task by task: each task's contexts make one prefix tree (one across tasks would share little)."""
        by_task = defaultdict(list)
        for i, request in enumerate(requests):
            by_task[getattr(request, "task_name", None)].append(i)
        if len(by_task) <= 1:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        results = [None] * len(requests)
        for indices in by_task.values():
            for i, result in zip(indices, super().loglikelihood([requests[i] for i in indices], disable_tqdm)):
                results[i] = result
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """lm-eval's windows; their is_greedy is dropped by lm-eval, so the argmax is not computed."""
        self._with_greedy = False
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self._with_greedy = True

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """[(log p(continuation | context), is_greedy)] for [((context, continuation) strings or None,
        context token ids, continuation token ids)], in request order."""
        if self.fallback_reason() is not None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        groups: dict[tuple[int, ...], int] = {}
        contexts, continuations, slot = [], [], []
        truncated = 0
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"a loglikelihood request needs a non-empty context and a continuation of 1 to "
                                 f"max_length={self.max_length} tokens; got {len(context)} and {len(continuation)}")
            # lm-eval's hf feeds (context + continuation)[-(max_length + 1):][:-1]: the context is cut on the left
            keep = self.max_length + 1 - len(continuation)
            truncated += len(context) > keep
            key = tuple(context[-keep:])
            if key not in groups:
                groups[key] = len(contexts)
                contexts.append(list(key))
                continuations.append([])
            slot.append((groups[key], len(continuations[groups[key]])))
            continuations[groups[key]].append(list(continuation))
        if truncated:
            logger.warning("%d requests are longer than max_length=%d: their contexts are cut on the left, as "
                           "lm-eval's hf backend does", truncated, self.max_length)
        from tqdm.auto import tqdm
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests")
        with self._autocast():
            scores = score_continuations(self.model, self.tokenizer.pad_token_id, contexts, continuations,
                                         batch_size=self._rows_per_forward(requests, override_bs),
                                         share_prefixes=self.share_prefixes,
                                         greedy=self._with_greedy, progress=bar.update)
        bar.close()
        results = []
        for (request, _, _), (c, k) in zip(requests, slot):
            answer = (scores.logprobs[c][k], bool(scores.greedy[c][k]) if scores.greedy is not None else False)
            results.append(answer)
            if request is not None:  # loglikelihood_rolling's windows have no key; it caches per document
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    # -- helpers ------------------------------------------------------------------------------------------------

    def _autocast(self):
        """HFLM's mixed precision (`mixed_precision_dtype`), as its _model_call applies it."""
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    def _rows_per_forward(self, requests, override_bs) -> int:
        if override_bs:
            return int(override_bs)
        if self.batch_size != "auto":
            return int(self.batch_size)
        # lm-eval's own search (full-length hf forwards, so it errs small for this scorer), on the longest request
        longest = max(range(len(requests)), key=lambda i: len(requests[i][1]) + len(requests[i][2]))
        return self._detect_batch_size(requests, longest)

    def fallback_reason(self) -> str | None:
        """Why this model is scored by lm-eval's own code (None: it is not); probed once, on first use."""
        if not self._probed:
            self._probed = True
            self._fallback_reason = self._probe()
            if self._fallback_reason is not None:
                logger.warning("cai: scoring with lm-eval's own hf code, not the batched scorer: %s",
                               self._fallback_reason)
        return self._fallback_reason

    @torch.no_grad()
    def _probe(self) -> str | None:
        """Score a few short random requests both ways (two contexts sharing a prefix, branching continuations:
        a cached parent, tree attention); a model that differs is not one this scorer covers."""
        if self.backend != "causal":
            return f"the {self.backend} backend is not a decoder-only model"
        config = self.model.config
        changed = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
        if changed:
            return f"the model's config transforms its logits after the LM head ({', '.join(changed)})"
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, lm_head(self.model)[0].shape[0], (12,), generator=generator).tolist()
        contexts = [ids[:5], ids[:3] + ids[8:10]]
        continuations = [[ids[5:8], ids[9:11]], [ids[10:12]]]
        try:
            with self._autocast():
                got = score_continuations(self.model, self.tokenizer.pad_token_id, contexts, continuations,
                                          batch_size=2, greedy=True).logprobs
            expected = []
            for context, options in zip(contexts, continuations):
                expected.append([])
                for option in options:
                    logits = self._model_call(torch.tensor([context + option[:-1]], device=self.device))[0]
                    logp = torch.log_softmax(logits.float(), -1)[len(context) - 1:]
                    rows = torch.arange(len(option), device=logp.device)
                    expected[-1].append(logp[rows, torch.tensor(option, device=logp.device)].sum().item())
        except Exception as err:  # any model this path cannot drive is scored the ordinary way
            return f"{type(err).__name__}: {err}"
        tolerance = 1e-3 if self.model.dtype == torch.float32 and self.mixed_precision_dtype is None else 5e-2
        for ours, theirs in zip((x for row in got for x in row), (x for row in expected for x in row)):
            if not math.isclose(ours, theirs, abs_tol=tolerance * (1 + abs(theirs))):
                return f"its log-probs from the LM head differ from its logits' ({ours:.5f} vs {theirs:.5f})"
        return None


def write_mc_task(data: str, folder, *, name: str = "cai_mc") -> Path:
    """Write an lm-eval task YAML (`folder/name.yaml`) for a multiple-choice file in the paper's format.

    `data`: a JSONL path, `builtin:NAME` or `paper:NAME` (cai.data.resolve_path). The YAML points at the file
    (`dataset_path: json`, nothing is copied): `doc_to_text` is the prompt, the choices are `corrects +
    incorrects` as continuations (no delimiter: the options carry their own leading space), and the targets are
    the correct ones, so lm-eval's `acc` is `cai eval mc`'s accuracy. Run it with `--include_path folder
    --tasks name`.
    """
    import yaml

    from .data import resolve_path

    path = resolve_path(data)
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"data {data!r}: no such file on this machine (paper: files are read from "
                                f"$CAI_PAPER_DATA)")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"name must be letters, digits, '_' or '-'; got {name!r}")
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{corrects + incorrects}}",
        "doc_to_target": "{{range(corrects | length) | list}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.yaml"
    target.write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return target
