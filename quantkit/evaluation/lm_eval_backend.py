"""lm-evaluation-harness model type `quantkit`: score any artifact quantkit reads (an HF folder, a GGUF file)
with lm-eval tasks, through the variants `quantkit eval` uses (quantkit.evaluation.variants).

lm-eval 0.4 finds a model type only in its registry, which a module fills when imported (lm-eval reads no entry
points), so run lm-eval's own CLI through this module (`pip install 'quantkit[lm-eval]'`):

    python -m quantkit.evaluation.lm_eval_backend --model quantkit \\
        --model_args pretrained=gguf/m-Q4_K_M.gguf,baseline=models/m,backend=torch --device cpu --tasks hellaswag

or, from Python, import this module before naming the model:

    import lm_eval
    import quantkit.evaluation.lm_eval_backend  # noqa: F401 (registers "quantkit")
    lm_eval.simple_evaluate(model="quantkit", model_args="pretrained=...,baseline=...", tasks=[...])

model_args:
- pretrained: an HF folder, a GGUF file, or a bundled model's name (tiny-qwen2, ...).
- baseline: for a GGUF, the HF folder it was made from: its tokenizer.json, and its config.json (the
  architecture, on the torch backend).
- backend: auto (llama.cpp for a GGUF when llama-cpp-python is installed, else torch) | torch | llama.cpp.
- device: the torch backend's device; wins over --device (lm-eval's CLI sends cuda:0 unless told; without CUDA
  the CPU is used).
- max_length: the longest sequence one forward sees (default: the config's context length). Lower it for
  long-context models: the llama.cpp backend allocates its context, and logits for every position, up front.
- batch_size: sequences per forward; threads: llama.cpp threads.

Text goes through tokenizer.json (the `tokenizers` library), with a BOS in front when tokenizer_config.json
sets add_bos_token, as transformers does. Generation is greedy: do_sample and temperature are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as err:
    raise ImportError("the lm-eval model type needs lm-evaluation-harness: pip install 'quantkit[lm-eval]'") from err
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from quantkit.bundled import resolve_model
from quantkit.errors import ConfigError, QuantkitError
from quantkit.evaluation.variants import HFVariant, open_variant
from quantkit.model import Model

_CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")  # where configs name it, in lm-eval's order
_DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when a config names no context length
_DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf model's default
_AUTO_BATCH = 8  # batch_size=auto probes GPU memory in lm-eval's hf model; a fixed batch does here


@register_model("quantkit")
class QuantkitLM(TemplateLM):
    """lm-eval's LM API over a quantkit Variant: log-likelihoods from its logits, and greedy generation."""

    def __init__(self, pretrained: str, baseline: str | None = None, backend: str = "auto", device: str | None = None,
                 max_length: int | None = None, batch_size: int | str = 1, threads: int | None = None):
        super().__init__()
        path = resolve_model(str(pretrained))
        if path.suffix == ".gguf" and baseline is None:
            raise ConfigError(f"{path}: a GGUF needs baseline=HF_FOLDER, the checkpoint it was made from (its "
                              "tokenizer.json tokenizes the text)")
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        # the HF checkpoint (the target itself, or a GGUF's baseline), opened once: config, tokenizer, BOS
        source = Model(path if path.suffix != ".gguf" else resolve_model(str(baseline)), device=device)
        folder, settings = source.folder, source.config or {}
        self.max_length = int(max_length or next((settings[k] for k in _CONTEXT_KEYS if settings.get(k)),
                                                 _DEFAULT_MAX_LENGTH))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else _AUTO_BATCH
        self.tokenizer = source.tokenizer("tokenize lm-eval's requests with")
        self.bos = source.bos  # put in front of every text, when the tokenizer adds one
        eos = settings.get("eos_token_id")
        self._eot = _special_id(folder, self.tokenizer, "eos_token")
        if self._eot is None:
            self._eot = eos[0] if isinstance(eos, list) else eos
        if self._eot is None:
            raise ConfigError(f"{folder}: no EOS token in tokenizer_config.json or config.json")
        self._prefix = _special_id(folder, self.tokenizer, "bos_token")
        if path.suffix == ".gguf":
            source.close()
            self.variant = open_variant(path, backend, config=settings, n_ctx=self.max_length, device=device,
                                        threads=threads)
        else:
            self.variant = HFVariant(source)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> QuantkitLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> QuantkitLM:
        """model_args win over the evaluator's device and batch_size: lm-eval's CLI always sends a device, which
        would otherwise clash with device= in model_args. max_batch_size only bounds lm-eval's batch probing."""
        extra = {k: v for k, v in (additional_config or {}).items()
                 if k in ("device", "batch_size") and v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: BOS, else EOS (as lm-eval's hf)."""
        return self._eot if self._prefix is None else self._prefix

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string, add_special_tokens=False).ids
        if self.bos is not None and add_special_tokens is not False and ids[:1] != [self.bos]:
            ids = [self.bos] + ids
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: (strings or None, context ids, continuation ids) -> (log-likelihood, is greedy) per request.
        A sequence longer than max_length loses tokens on the left, as in lm-eval's hf model."""
        longest = max((len(continuation) for _, _, continuation in requests), default=0)
        if longest > self.max_length:
            raise QuantkitError(f"a continuation of {longest} tokens exceeds max_length {self.max_length}")
        inputs = [(context + continuation)[-(self.max_length + 1):-1] for _, context, continuation in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))  # alike lengths batch: less padding
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="quantkit loglikelihood"):
            rows = order[start:start + self.batch_size]
            # right padding: with causal attention it never changes the logits before it
            batch = torch.zeros(len(rows), len(inputs[rows[0]]), dtype=torch.long)
            for row, i in enumerate(rows):
                batch[row, :len(inputs[i])] = torch.tensor(inputs[i])
            logprobs = torch.log_softmax(self.variant.logits(batch), dim=-1)
            for row, i in enumerate(rows):
                strings, _, continuation = requests[i]
                target = torch.tensor(continuation)
                scores = logprobs[row, len(inputs[i]) - len(continuation):len(inputs[i])]
                results[i] = (float(scores.gather(-1, target[:, None]).sum()),
                              bool((scores.argmax(-1) == target).all()))
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood after the prefix token, in disjoint windows of max_length tokens
        (lm-eval's rolling windows, as its hf model scores perplexity tasks)."""
        windows, owners = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[n] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string, EOS or max_gen_toks. Every step runs the whole sequence again:
        variants score sequences and keep no KV cache, and lm-eval's generations are short."""
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="quantkit generate_until"):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, _DEFAULT_MAX_GEN_TOKS)
            until = [stop for stop in kwargs["until"] if stop]
            budget = kwargs["max_gen_toks"]
            if budget >= self.max_length:
                raise QuantkitError(f"max_gen_toks {budget} leaves no room for a context in max_length "
                                    f"{self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - budget):] or [self.prefix_token_id]
            generated: list[int] = []
            text = ""
            while len(generated) < budget:
                token = int(self.variant.logits(torch.tensor([ids + generated]))[0, -1].argmax())
                if token == self.eot_token_id:
                    break
                generated.append(token)
                text = self.tok_decode(generated)
                if any(stop in text for stop in until):
                    break
            text = postprocess_generated_text(text, until, None)
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out

    def get_model_info(self) -> dict:
        """Goes into lm-eval's results config: which artifact, format, type and backend were scored."""
        return {"quantkit": self.variant.describe()}


def _special_id(folder: Path, tokenizer, name: str) -> int | None:
    """The id of tokenizer_config.json's `name` (bos_token, eos_token): what transformers' tokenizer reports."""
    file = folder / "tokenizer_config.json"
    token = json.loads(file.read_text()).get(name) if file.is_file() else None
    if isinstance(token, dict):  # older files store an AddedToken
        token = token.get("content")
    return tokenizer.token_to_id(token) if token else None


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
