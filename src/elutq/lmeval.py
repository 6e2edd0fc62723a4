"""lm-evaluation-harness backend: ``lm_eval --model elutq --model_args pretrained=CKPT`` (or ``elutq eval
CKPT --tasks ...``) scores tasks with the native runtime.

Requests run one after another, sorted by their tokens so that consecutive ones share the longest prefix
(a multiple-choice question's choices, few-shot examples): the session keeps the KV cache of that prefix
and only the rest runs.  A request's context runs with the last-row logits only; its continuation with
every row, in prefill chunks, so memory stays one chunk of logits whatever the length.  Tokenization
follows lm-eval's ``hf`` backend (the same ``add_bos_token`` rule), so both score the same token ids.

lm-eval is an optional extra: ``pip install 'elutq[lm-eval]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .generation import common_prefix
from .runtime import PREFILL_CHUNK, Model, Session, load
from .utils import ElutqError

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own backends first: it loads them only into an empty registry)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ElutqError("the lm-eval backend needs lm-evaluation-harness: `pip install 'elutq[lm-eval]'`") from e


@register_model("elutq")
class ElutqLM(TemplateLM):
    """An elutq checkpoint (or any model ``elutq.load`` accepts) as an lm-eval model.  ``float_tables``: the exact
    float-table kernels (slow; for checking against the ``hf`` backend), as :func:`elutq.load`."""

    def __init__(
        self,
        pretrained: str | Model,
        max_length: int | None = None,
        threads: int | None = None,
        add_bos_token: bool | None = None,
        max_gen_toks: int = 256,
        float_tables: bool = False,
        **_: Any,  # lm-eval's own keys (batch_size, device, ...): requests run one at a time on the CPU
    ):
        super().__init__()
        self.model = pretrained if isinstance(pretrained, Model) else load(
            pretrained, threads=threads, float_tables=float_tables
        )
        if self.model.tokenizer is None:
            raise ElutqError(f"{pretrained} has no tokenizer; lm-eval needs one to encode its requests")
        self.tokenizer = self.model.tokenizer
        self.max_length = min(int(max_length or self.model.max_ctx), self.model.max_ctx)
        self.add_bos_token = add_bos_token
        self.max_gen_toks = int(max_gen_toks)
        self.session = Session(self.model, max_ctx=self.max_length)

    # -- tokens

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else min(self.model.eos_ids))

    @property
    def prefix_token_id(self) -> int:  # what an empty context starts from: BOS where there is one (as hf)
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        add = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        kw = {} if add is None else {"add_special_tokens": bool(add)}
        return list(self.tokenizer.encode(string, **kw))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # -- scoring

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether every continuation token is the argmax."""
        ids = (context + continuation)[-(self.max_length + 1) :]
        inp, n = ids[:-1], len(continuation)
        if n == 0:
            return 0.0, True
        s = self.session
        keep = min(common_prefix(s.tokens, inp), len(inp) - n)
        s.tokens = s.tokens[:keep]  # positions past `keep` are overwritten by the next forward
        head, tail = inp[keep : len(inp) - n], inp[len(inp) - n :]
        for i in range(0, len(head), PREFILL_CHUNK):
            self.model.forward(s, head[i : i + PREFILL_CHUNK])
        targets = ids[len(ids) - n :]
        logprob, greedy = 0.0, True
        for i in range(0, n, PREFILL_CHUNK):
            logits = torch.from_numpy(self.model.forward(s, tail[i : i + PREFILL_CHUNK], all_logits=True))
            t = torch.tensor(targets[i : i + PREFILL_CHUNK])
            lp = torch.log_softmax(logits.double(), dim=-1)
            logprob += float(lp.gather(1, t[:, None]).sum())
            greedy = greedy and bool((lp.argmax(dim=-1) == t).all())
        return logprob, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for i in tqdm(order, desc="elutq loglikelihood", disable=disable_tqdm):
            _, context, continuation = requests[i]
            out[i] = self._score(list(context), list(continuation))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for ctx, pred in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, pred))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        total = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores, strict=True):
            total[r] += lp
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="elutq generate", disable=disable_tqdm):
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            eot = self.tok_decode([self.eot_token_id])
            if eot not in until:
                until.append(eot)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if sample else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
            max_new = min(max_new, self.max_length - len(ids))
            done = self.model.generate(
                ids=ids,
                max_new_tokens=max(1, max_new),
                temperature=temperature,
                top_p=float(kw.pop("top_p", 1.0)) if sample else 1.0,
                top_k=0,
                repetition_penalty=1.0,
                stop=until,
                seed=0,
                session=self.session,
            )
            text = done.text
            for u in until:  # the reply ends before the first stop string, as the hf backend cuts it
                text = text.split(u)[0] if u else text
            out.append(text)
        return out


def evaluate(
    model: str | Model,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | None = None,
    threads: int | None = None,
    max_length: int | None = None,
    seed: int = 0,
) -> dict:
    """``lm_eval.simple_evaluate`` with the elutq backend; ``include_path``: a folder of task YAMLs of your own."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = ElutqLM(model, max_length=max_length, threads=threads)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ElutqError(f"unknown lm-eval task(s) {unknown}; see `lm_eval --tasks list`, or pass --include-path DIR")
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )


def results_table(results: dict) -> str:
    """lm-eval's markdown table of :func:`evaluate`'s results."""
    return make_table(results)


__all__ = ["ElutqLM", "evaluate", "results_table"]
