"""The lm-eval model type `quantkit`: lm-eval tasks (local YAMLs over local JSONL, no downloads) score an HF
folder and a GGUF of it, with the log-likelihoods quantkit's own variants give."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[test]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from quantkit.bundled import model_path, textsets  # noqa: E402
from quantkit.bundled.tasks import next_line_items  # noqa: E402
from quantkit.errors import ConfigError  # noqa: E402
from quantkit.evaluation.lm_eval_backend import QuantkitLM  # noqa: E402

TASKS_DIR = Path(__file__).parent / "data" / "lmeval"
MC, PPL = "quantkit_next_line", "quantkit_heldout_ppl"
MODEL = "tiny-qwen2"
LIMIT = 12  # multiple-choice items scored per run (of 20); the perplexity task has 3 documents


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The tasks' JSONL, made here from the interpreter's standard library (the repo stores none of its text)."""
    root = tmp_path_factory.mktemp("lmeval")
    (root / "next_line.jsonl").write_text("".join(json.dumps(item) + "\n" for item in next_line_items(20)))
    docs = dict(zip(textsets.HELDOUT, textsets.documents("heldout"), strict=True))
    texts = ["\n".join(docs[name].split("\n")[200:260]) + "\n" for name in ("argparse", "difflib", "fractions")]
    (root / "heldout_docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


@pytest.fixture(scope="module")
def q8(bundled_gguf):
    return bundled_gguf(MODEL, "Q8_0")


@pytest.fixture(scope="module")
def lm():
    return QuantkitLM.create_from_arg_string(f"pretrained={MODEL}", {"device": "cpu"})


@pytest.fixture(scope="module")
def task_manager():
    """An index of our tasks alone, for every in-process run of the module: indexing lm-eval's own thousands of
    task YAMLs too took 13 s and none of them is run (the CLI test indexes them, as users' runs do)."""
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def _evaluate(workdir, task_manager, model_args: str, tasks=(MC, PPL)) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)  # the YAMLs' data_files resolve from the working directory
        return lm_eval.simple_evaluate(model="quantkit", model_args=model_args, tasks=list(tasks), device="cpu",
                                       limit=LIMIT, task_manager=task_manager)


@pytest.fixture(scope="module")
def folder_results(workdir, task_manager):
    return _evaluate(workdir, task_manager, f"pretrained={model_path(MODEL)}")


def test_tasks_score_the_hf_folder_and_its_q8_gguf(workdir, task_manager, q8, folder_results):
    folder = folder_results
    gguf = _evaluate(workdir, task_manager, f"pretrained={q8},baseline={model_path(MODEL)},backend=torch")
    for out, fmt in ((folder, "hf"), (gguf, "gguf")):
        assert out["config"]["quantkit"]["format"] == fmt
        mc, ppl = out["results"][MC], out["results"][PPL]
        print(fmt, {k: mc[f"{k},none"] for k in ("acc", "acc_norm")},
              {k: ppl[f"{k},none"] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")})
        assert 0 <= mc["acc,none"] <= 1 and 0 <= mc["acc_norm,none"] <= 1
        assert out["n-samples"][MC]["effective"] == LIMIT
        assert 1 < ppl["word_perplexity,none"] < math.inf
    ratio = gguf["results"][PPL]["word_perplexity,none"] / folder["results"][PPL]["word_perplexity,none"]
    assert abs(ratio - 1) < 0.03


def test_loglikelihood_is_quantkits_choice_logprobs(lm):
    """Same tokens, same numbers: lm-eval moves the context's trailing newline into the continuation."""
    tokenizer = lm.tokenizer
    requests, expected = [], []
    for item in next_line_items(3):
        context = item["context"].rstrip("\n")
        for choice in item["choices"]:
            requests.append(Instance("loglikelihood", {}, (context, "\n" + choice), len(requests)))
            whole = tokenizer.encode(context + "\n" + choice, add_special_tokens=False).ids
            head = tokenizer.encode(context, add_special_tokens=False).ids
            expected.append(lm.variant.choice_logprobs(head, [whole[len(head):]])[0])
    got = lm.loglikelihood(requests, disable_tqdm=True)
    assert [g for g, _ in got] == pytest.approx(expected, abs=1e-3)
    assert all(isinstance(greedy, bool) for _, greedy in got)
    assert all(logprob < 0 for logprob, _ in got)


def test_rolling_loglikelihood_is_the_whole_text_and_windows_when_long(lm, workdir):
    text = json.loads((workdir / "heldout_docs.jsonl").read_text().splitlines()[0])["text"]
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    ids = lm.tok_encode(text)
    assert len(ids) < lm.max_length
    [whole] = lm.variant.choice_logprobs([lm.prefix_token_id], [ids])  # all of it after the prefix token
    assert lm.loglikelihood_rolling([request], disable_tqdm=True) == pytest.approx([whole], rel=1e-4)
    short = QuantkitLM(MODEL, device="cpu", max_length=32)
    windows = list(map(make_disjoint_window, get_rolling_token_windows(ids, short.prefix_token_id, 32, 1)))
    assert len(windows) == math.ceil(len(ids) / 32)
    expected = sum(short.variant.choice_logprobs(context, [continuation])[0] for context, continuation in windows)
    assert short.loglikelihood_rolling([request], disable_tqdm=True) == pytest.approx([expected], rel=1e-4)


def test_generate_until_is_greedy_and_stops_at_until(lm):
    context = next_line_items(1)[0]["context"]

    def generate(**gen_kwargs):
        [text] = lm.generate_until([Instance("generate_until", {}, (context, gen_kwargs), 0)], disable_tqdm=True)
        assert isinstance(text, str)
        return text

    free = generate(until=[], max_gen_toks=16)
    assert len(lm.tok_encode(free)) <= 16 and len(free) > 4
    stop = free[2:4]
    assert generate(until=[stop], max_gen_toks=16) == free[:free.index(stop)]
    assert "\n" not in generate(until=["\n"], max_gen_toks=16)


def test_cli_through_the_module(workdir):
    """`python -m quantkit.evaluation.lm_eval_backend` is lm-eval's CLI with the model type registered; device in
    model_args wins over the CLI's default cuda:0."""
    done = subprocess.run([sys.executable, "-m", "quantkit.evaluation.lm_eval_backend", "--model", "quantkit",
                           "--model_args", f"pretrained={MODEL},device=cpu", "--tasks", PPL,
                           "--include_path", str(TASKS_DIR), "--limit", "1"],
                          cwd=workdir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert PPL in done.stdout and "word_perplexity" in done.stdout


def test_a_gguf_needs_the_baseline_for_its_tokenizer(q8):
    with pytest.raises(ConfigError, match="baseline"):
        QuantkitLM(str(q8))


@pytest.mark.interop
def test_llama_cpp_backend(q8, workdir, task_manager, folder_results):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]')")
    gguf = _evaluate(workdir, task_manager, f"pretrained={q8},baseline={model_path(MODEL)},backend=llama.cpp",
                     tasks=[PPL])
    folder = folder_results
    assert gguf["config"]["quantkit"]["backend"] == "llama.cpp"
    ratio = gguf["results"][PPL]["word_perplexity,none"] / folder["results"][PPL]["word_perplexity,none"]
    print("llama.cpp Q8_0 / HF word_perplexity", ratio)
    assert abs(ratio - 1) < 0.03
