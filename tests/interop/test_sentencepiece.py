"""SentencePiece models (Llama 2 / Mistral style) in llama.cpp: whether the GGUF's tokenizer came from
tokenizer.model, from transformers' tokenizer.json or from both, llama.cpp splits text exactly as
SentencePiece and the HF tokenizer do, and computes quantkit's logits on the converted weights."""

import pytest

from quantkit import convert as api
from quantkit.bundled import textsets
from quantkit.evaluation.runner import evaluate
from quantkit.testing.factory import make_tiny_model

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]')")
sentencepiece = pytest.importorskip("sentencepiece", reason="the test extras provide sentencepiece")
pytestmark = pytest.mark.interop

VOCAB = 1000
KINDS = ["spm", "spm-json", "spm-model"]
# text SentencePiece must fall back to bytes for, runs of spaces and newlines
EDGE_TEXT = "Grüße — naïve café, 中文 and emoji 🙂.\n\n\n    indented\ttab  two  spaces \r\n"
MARKUP = "<s> is text here </s>"  # HF always splits added tokens out; SentencePiece and llama.cpp need not


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    overrides = {"vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512}
    return {kind: make_tiny_model(root / kind, "llama", tokenizer=kind, config_overrides=overrides) for kind in KINDS}


@pytest.fixture(scope="module")
def ggufs(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("spm-gguf")
    return {kind: api.convert(folder, ["gguf:Q8_0"], out / f"{kind}.gguf")[0][0] for kind, folder in folders.items()}


def _vocab_only(path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_tokenizes_like_sentencepiece_and_hf(folders, ggufs, kind):
    from tokenizers import Tokenizer

    processor = sentencepiece.SentencePieceProcessor(model_file=str(folders["spm"] / "tokenizer.model"))
    hf = Tokenizer.from_file(str(folders["spm"] / "tokenizer.json"))
    llm = _vocab_only(ggufs[kind])
    for text in (textsets.text("heldout")[:30000], EDGE_TEXT):
        expected = processor.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == expected
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected
    assert llm.tokenize(MARKUP.encode(), add_bos=False, special=False) == processor.encode(MARKUP)
    assert llm.tokenize(b"hello", add_bos=True) == [1, *processor.encode("hello")]
    assert llm.tokenize(b"<s>hello</s>", add_bos=False, special=True) == [1, *processor.encode("hello"), 2]
    assert llm.detokenize(processor.encode(EDGE_TEXT)).decode() == " " + EDGE_TEXT


def test_llama_cpp_logits_and_eval_on_a_sentencepiece_model(folders, tmp_path):
    folder = folders["spm"]
    [(q4, _)] = api.convert(folder, ["gguf:Q4_K_M"], tmp_path / "q4.gguf")
    torch_report = evaluate(folder, [q4], ctx=128, max_windows=6, mc_items=0, backend="torch")
    llama_report = evaluate(folder, [q4], ctx=128, max_windows=6, mc_items=0, backend="llama.cpp")
    (ours,), (theirs,) = torch_report["variants"], llama_report["variants"]
    assert abs(theirs["ppl"] / ours["ppl"] - 1) < 5e-3  # measured 0.002% apart
    assert abs(theirs["kld"]["mean"] / ours["kld"]["mean"] - 1) < 0.1  # measured 1.4% apart
