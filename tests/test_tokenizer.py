"""The special tokens a tokenizer adds, read once (quantkit.tokenizer) for the GGUF metadata and for the BOS that
calibration and evaluation put at each chunk start; transformers >= 5 states them only in tokenizer.json's
post-processor. gguf-py's SpecialVocab, which convert_hf_to_gguf.py uses, is the reference."""

import json
import shutil

import pytest
from gguf import SpecialVocab

from quantkit.formats.gguf.tokenizer import tokenizer_metadata
from quantkit.testing.tokenizer import BOS, EOS, PAD
from quantkit.tokenizer import added_bos, special_tokens

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2  # the test tokenizer's special tokens come first


def _special(token):
    return {"SpecialToken": {"id": token, "type_id": 0}}


def _template(*tokens):
    """A TemplateProcessing that puts `tokens` around the text ("A" marks where)."""
    single = [_special(t) if t != "A" else {"Sequence": {"id": "A", "type_id": 0}} for t in tokens]
    pair = single + [{"Sequence": {"id": "B", "type_id": 1}} if t == "A" else _special(t) for t in tokens][1:]
    ids = {BOS: BOS_ID, EOS: EOS_ID, PAD: PAD_ID}
    return {"type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in tokens if t != "A"}}


@pytest.fixture
def folder(model_cache, tmp_path):
    """The tiny llama's tokenizer as transformers 5 saves it: no add_bos_token / add_eos_token."""
    dst = tmp_path / "tok"
    shutil.copytree(model_cache("llama"), dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    del config["add_bos_token"], config["add_eos_token"]
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def _set(folder, post_processor=None, **tokenizer_config):
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["post_processor"] = post_processor
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **tokenizer_config}))


def _metadata(folder):
    config = json.loads((folder / "config.json").read_text())
    meta = tokenizer_metadata(folder, config["vocab_size"], config)
    return {k.removeprefix("tokenizer.ggml."): v.value for k, v in meta.items()
            if k.startswith("tokenizer.ggml.") and ("token_id" in k or k.startswith("tokenizer.ggml.add_"))}


def _gguf_py(folder):
    vocab = SpecialVocab(folder, load_merges=False, n_vocab=512)
    meta = {f"add_{k}_token": v for k, v in vocab.add_special_token.items() if k in ("bos", "eos")}
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "eot": "eot_token_id"}
    meta.update({names[k]: v for k, v in vocab.special_token_ids.items() if k in names})
    return meta


def test_template_bos_is_added(folder):
    _set(folder, _template(BOS, "A"))
    assert _metadata(folder) == {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "padding_token_id": PAD_ID,
                                 "add_bos_token": True}
    assert _metadata(folder) == _gguf_py(folder)
    assert added_bos(folder, {"bos_token_id": BOS_ID}) == BOS_ID


def test_template_inside_a_sequence(folder):
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    _set(folder, {"type": "Sequence", "processors": [byte_level, _template(BOS, "A")]})
    assert _metadata(folder)["add_bos_token"] is True and "add_eos_token" not in _metadata(folder)
    assert _metadata(folder) == _gguf_py(folder)
    assert added_bos(folder, {}) == BOS_ID  # the id from tokenizer.json when config.json has none


def test_template_appending_eos(folder):
    _set(folder, _template(BOS, "A", EOS))
    assert special_tokens(folder).add_eos is True
    assert _metadata(folder) == {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "padding_token_id": PAD_ID,
                                 "add_bos_token": True, "add_eos_token": True}
    assert _metadata(folder) == _gguf_py(folder)


def test_trailing_token_other_than_eos_becomes_eos_and_eos_becomes_eot(folder):
    """gguf-py's rule: what the template appends is the EOS; the configured one stays as end-of-turn."""
    _set(folder, _template(BOS, "A", PAD))
    assert _metadata(folder) == {"bos_token_id": BOS_ID, "eos_token_id": PAD_ID, "padding_token_id": PAD_ID,
                                 "eot_token_id": EOS_ID, "add_bos_token": True, "add_eos_token": True}
    assert _metadata(folder) == _gguf_py(folder)


def test_tokenizer_config_flag_wins_over_post_processor(folder):
    _set(folder, _template(BOS, "A"), add_bos_token=False)
    assert _metadata(folder)["add_bos_token"] is False and added_bos(folder, {"bos_token_id": BOS_ID}) is None
    assert _metadata(folder) == _gguf_py(folder)


def test_tokenizer_config_alone_still_decides(folder):
    _set(folder, None, add_bos_token=True)
    assert _metadata(folder)["add_bos_token"] is True and added_bos(folder, {"bos_token_id": BOS_ID}) == BOS_ID
    _set(folder, None, add_bos_token=False)
    assert _metadata(folder)["add_bos_token"] is False and added_bos(folder, {"bos_token_id": BOS_ID}) is None
    assert _metadata(folder) == _gguf_py(folder)
