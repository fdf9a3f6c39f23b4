"""OpenRLHF's remote reward model call, ``POST /get_reward``, answered as its own ``serve_rm.py`` answers it.

OpenRLHF (``--reward.remote_url``; ``--remote_rm_url`` before 0.8) sends ``{"query": [text], "prompts",
"labels"}``, each query the decoded prompt and response with their special tokens already in the text.
``serve_rm.py`` tokenizes them with ``add_special_tokens=False``, cuts each to ``--data.max_len`` tokens (2048)
on the tokenizer's truncation side, takes the value at the last token and, with ``--reward.normalize_enable``,
gives ``(reward - mean) / std`` from the model's config.json. vexport does the same: ``--reward-max-len``
(default 2048, at most ``--max-length``), ``--reward-normalize``, and ``--reward-overlong refuse`` for a 400
instead of a cut. Nothing is silent: ``extra_logs.rm_truncated`` flags each cut query (OpenRLHF logs every
``extra_logs`` key per sample) and ``vexport_reward_truncated_total`` counts them.
"""

from __future__ import annotations

from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse

from vexport.errors import VexportError
from vexport.serve.schemas import RequestError, RewardRequest

SERVE_RM_MAX_LEN = 2048  # serve_rm.py's --data.max_len default
OVERLONG = ("truncate", "refuse")


def resolve(options, config):
    """OPTIONS with ``reward_max_len`` filled in and the normalisation constants read from CONFIG; checked."""
    if options.reward_overlong not in OVERLONG:
        raise VexportError(f"--reward-overlong must be one of {', '.join(OVERLONG)}, got {options.reward_overlong!r}")
    limit = options.reward_max_len or min(SERVE_RM_MAX_LEN, options.max_length)
    if not 1 <= limit <= options.max_length:
        raise VexportError(f"--reward-max-len must be in 1..--max-length ({options.max_length}), got {limit}")
    mean_std = None
    if options.reward_normalize:
        mean, std = getattr(config, "mean", None), getattr(config, "std", None)
        if not isinstance(mean, (int, float)) or not isinstance(std, (int, float)) or not std > 0:
            raise VexportError("--reward-normalize needs numbers 'mean' and 'std' > 0 in the model's config.json "
                               f"(OpenRLHF writes them when it trains with normalization); it has mean={mean!r}, "
                               f"std={std!r}")
        mean_std = (float(mean), float(std))
    return replace(options, reward_max_len=limit, reward_mean_std=mean_std)


class RewardEndpoint:
    """``/get_reward`` over an ``Api`` (routes.py): its tokenizer thread, its batcher, its metrics."""

    def __init__(self, api):
        self.api = api

    async def get_reward(self, request: Request, body: RewardRequest):
        api, options = self.api, self.api.options
        limit = options.reward_max_len or min(SERVE_RM_MAX_LEN, options.max_length)
        if options.reward_overlong == "refuse":
            sequences = await api.tokenize(api.encoder.texts, "query", body.query, False)
            _refuse_over(sequences, limit)
            cut = [False] * len(sequences)
        else:
            sequences, cut = await api.tokenize(api.encoder.cut_texts, "query", body.query, limit)
        rows = await api.score(request, "query", sequences)
        rewards = [float(row[-1]) for row in rows]
        if options.reward_mean_std is not None:
            mean, std = options.reward_mean_std
            rewards = [(r - mean) / std for r in rewards]
        api.metrics.reward_truncated.inc(sum(cut))
        return JSONResponse({"rewards": rewards, "scores": rewards,
                             "extra_logs": {"num_tokens": [len(s) for s in sequences],
                                            "rm_truncated": [int(c) for c in cut]}})


def _refuse_over(sequences: list[list[int]], limit: int) -> None:
    for i, ids in enumerate(sequences):
        if len(ids) > limit:
            raise RequestError(400, f"query[{i}]", f"query[{i}] is {len(ids)} tokens, over --reward-max-len {limit} "
                                                   "(the server runs with --reward-overlong refuse)")
