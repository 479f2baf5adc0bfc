"""An EleutherAI lm-evaluation-harness model: `loopedlm` (tested with lm-eval==0.4.13).

    loopedlm lm-eval --model loopedlm --model_args path=RUN,n_loops=6 --tasks ...
    python -m loopedlm.evaluate.lm_eval_adapter --model loopedlm --model_args ... --tasks ...

In Python, importing this module registers the model, after which
`lm_eval.simple_evaluate(model="loopedlm", model_args="path=RUN,n_loops=6", ...)` works.
The plain `lm_eval` command cannot see it: lm-eval 0.4.13 has no plugin discovery for
models, so use one of the two commands above (they run lm-eval's own CLI).

model_args: `path` (run or checkpoint folder), `n_loops` (default: the model's),
`tokenizer` (default: the run's), `device`, `batch_size`, `max_gen_toks`.
All three request types are implemented: `loglikelihood` (sum log-probability of the
continuation given the context, and whether greedy decoding would produce it),
`loglikelihood_rolling` (lm-eval's disjoint windows of the model's context length) and
`generate_until` (greedy).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from loopedlm.evaluate.scoring import score_sequences
from loopedlm.evaluate.tasks import EVAL_BATCH_SIZE

MODEL_NAME = "loopedlm"
logger = logging.getLogger(__name__)


class LoopedLMEval(LM):
    """lm-eval model wrapping a LoopedGPT at a fixed loop count."""

    def __init__(self, path: str | None = None, n_loops: int | str | None = None,
                 device: str | None = None, batch_size: int | str | None = None,
                 tokenizer: str | None = None, max_gen_toks: int | str = 256, *,
                 model: Any = None, tok: Any = None, **_ignored: Any) -> None:
        super().__init__()
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes its default device (cuda) even on CPU-only machines
            logger.warning("device %s is not available: using cpu", device)
            device = "cpu"
        self._device = device or "cpu"
        if model is None:
            if path is None:
                raise ValueError("model_args needs path=RUN_OR_CHECKPOINT")
            from loopedlm.data.runs import load_run

            model, tok, _, _ = load_run(path, self._device, tokenizer)
        if tok is None:
            raise ValueError("a tokenizer is needed (tok=...)")
        self.model, self.tok = model.eval(), tok
        n = model.config.loops(None if n_loops is None else int(n_loops))
        self.n_loops = n
        self.max_length = model.config.sequence_len
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = int(batch_size) if str(batch_size or "").isdigit() \
            else EVAL_BATCH_SIZE

    # ---- helpers ---------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log-prob of `cont`, greedy?) for (context tokens, continuation tokens)."""
        seqs, starts, ends = [], [], []
        for ctx, cont in pairs:
            # cropped only beyond the RoPE table; the last token is only a target
            whole = (ctx + cont)[-(self.model.config.rotary_len + 1):]
            seqs.append(whole)
            starts.append(max(1, len(whole) - len(cont)))
            ends.append(len(whole))
        _, greedy, logprob = score_sequences(self.model, seqs, starts, ends, n_loops=self.n_loops,
                                             device=self._device)
        return list(zip(logprob, greedy, strict=True))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # as lm-eval's HF model: trailing context whitespace moves into the continuation
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        return [self.tok.bos_id, *self.tok.encode(stripped)], self.tok.encode(continuation)

    # ---- the three request types ------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False,
                      ) -> list[tuple[float, bool]]:
        """Log-probability of each continuation given its context, and greedy exactness."""
        pairs = [self._encode_pair(*req.args) for req in requests]
        for (_ctx, cont), req in zip(pairs, requests, strict=True):
            if not cont:
                raise ValueError(f"empty continuation for context {req.args[0][-60:]!r}")
        return self._score(pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False,
                              ) -> list[float]:
        """Total log-probability of each string, in disjoint windows of the context length."""
        out = []
        for req in requests:
            tokens = self.tok.encode(req.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.tok.bos_id, max_seq_len=self.max_length,
                context_len=1)]
            scores = self._score([(list(ctx), list(pred)) for ctx, pred in windows])
            out.append(sum(lp for lp, _ in scores))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation, cut at the first `until` string."""
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = [self.tok.bos_id, *self.tok.encode(context)]
            ids = ids[-max(1, self.max_length - max_new):]
            text = self._greedy(ids, max_new, until)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out

    @torch.no_grad()
    def _greedy(self, ids: list[int], max_new: int, until: list[str]) -> str:
        new: list[int] = []
        try:
            from loopedlm.infer.generate import stream
        except ImportError:
            stream = None
        if stream is not None:  # the KV-cache decoder
            for step in stream(self.model, [ids], n_loops=self.n_loops, max_tokens=max_new,
                               temperature=0.0, add_bos=False):
                if step.tokens[0] is None:
                    break
                new.append(step.tokens[0])
                if any(s and s in self.tok.decode(new) for s in until):
                    break
            return self.tok.decode(new)
        return self.tok.decode(greedy_recompute(self.model, ids, max_new, self.n_loops,
                                                self.tok, until))


@torch.no_grad()
def greedy_recompute(model: Any, ids: list[int], max_new: int, n_loops: int, tok: Any,
                     until: list[str] = ()) -> list[int]:
    """Greedy decoding by full forward passes (no cache): the reference for the cached path."""
    device = model.lm_head.weight.device
    new: list[int] = []
    for _ in range(max_new):
        if len(ids) + len(new) > model.config.sequence_len:
            break
        idx = torch.tensor([ids + new], dtype=torch.long, device=device)
        new.append(int(model(idx, n_loops=n_loops)[0, -1].argmax()))
        if any(s and s in tok.decode(new) for s in until):
            break
    return new


def register() -> None:
    """Register `loopedlm` in lm-eval's model registry (idempotent)."""
    import lm_eval.models  # noqa: F401  - the built-in models first (lm-eval registers lazily)
    from lm_eval.api.registry import model_registry, register_model

    if MODEL_NAME not in model_registry.keys():
        register_model(MODEL_NAME)(LoopedLMEval)


def run_lm_eval_cli(argv: list[str]) -> int:
    """lm-eval's own command line, with `loopedlm` registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


register()

if __name__ == "__main__":
    sys.exit(run_lm_eval_cli(sys.argv[1:]))
