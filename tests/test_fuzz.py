"""Fuzzing (issue 27): safetensors headers, config.json, GGUF headers and server request bodies.
The property: a clear error (ElutqError, or a 4xx in OpenAI's shape) or a correct result — never
another exception, a 500 or a hang.  Bounded: a few dozen examples each, well under 30 s in all."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoTokenizer

import elutq
from conftest import save_tiny_model
from elutq.checkpoint import read_header, save_quantized
from elutq.hlq import QuantConfig
from elutq.models import load_config
from elutq.quantize import quantize
from elutq.utils import ElutqError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
_counter = itertools.count()

# ----------------------------------------------------------------------------- safetensors headers

DTYPES = ["F16", "BF16", "F32", "U8", "I8", "I64", "F64", "BOOL", "XX", "f16", 3, None]
entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=3), st.just("x"), st.none()),
    "data_offsets": st.one_of(st.lists(st.integers(-3, 120), min_size=0, max_size=3), st.text(max_size=2)),
})
headers = st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(entry, st.integers(), st.text()), max_size=4)


def _sane(tmp: Path, header_bytes: bytes, n: int, data: bytes) -> Path:
    f = tmp / f"h{next(_counter)}.safetensors"
    f.write_bytes(n.to_bytes(8, "little") + header_bytes + data)
    return f


@FAST
@given(header=headers, data_len=st.integers(0, 130), lie=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzz_safetensors_header(tmp_path_factory, header, data_len, lie):
    tmp = tmp_path_factory.getbasetemp()
    raw = json.dumps(header).encode()
    f = _sane(tmp, raw, len(raw) if lie is None else lie, bytes(data_len))
    try:
        got = read_header(f)
    except ElutqError:
        return
    # accepted: safetensors itself reads the same tensors
    with safe_open(str(f), framework="np") as h:
        assert set(h.keys()) == set(got)
        for k in got:
            assert tuple(h.get_slice(k).get_shape()) == got[k][1]
            assert h.get_slice(k).get_dtype() == got[k][0]


@FAST
@given(blob=st.binary(max_size=64))
def test_fuzz_safetensors_random_bytes(tmp_path_factory, blob):
    f = tmp_path_factory.getbasetemp() / f"r{next(_counter)}.safetensors"
    f.write_bytes(blob)
    with pytest.raises(ElutqError):
        read_header(f)


# ----------------------------------------------------------------------------- config.json

LIN = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fuzzckpt")
    model = save_tiny_model(tmp / "src", "llama-untied")
    quantize(model, QuantConfig(2, 32), progress=False)
    return save_quantized(model, AutoTokenizer.from_pretrained(tmp / "src"), tmp / "q", {"method": "rtn"})


VALUES = st.one_of(st.integers(-3, 300), st.sampled_from([0, 2**40, 1.5, float("nan"), "", "x", None, True, [], {}]))
PATHS = [
    ("num_hidden_layers",), ("hidden_size",), ("intermediate_size",), ("num_attention_heads",),
    ("num_key_value_heads",), ("vocab_size",), ("rms_norm_eps",), ("max_position_embeddings",), ("head_dim",),
    ("tie_word_embeddings",), ("architectures",), ("quantization_config",), ("quantization_config", "version"),
    ("quantization_config", "modules"), ("quantization_config", "shards"), ("quantization_config", "quant_method"),
    ("quantization_config", "modules", LIN), ("quantization_config", "modules", LIN, "bits"),
    ("quantization_config", "modules", LIN, "group_size"), ("quantization_config", "modules", "lm_head", "bits"),
]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=3),
       garble=st.one_of(st.none(), st.integers(0, 400)))
def test_fuzz_config_json(tiny_ckpt, tmp_path_factory, edits, garble):
    ck = tmp_path_factory.getbasetemp() / f"c{next(_counter)}"
    shutil.copytree(tiny_ckpt, ck, ignore=shutil.ignore_patterns("kernel-cache", ".verified.json"))
    cfg = json.loads((ck / "config.json").read_text())
    for path, value in edits:
        node = cfg
        for k in path[:-1]:
            node = node.setdefault(k, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[path[-1]] = value
    text = json.dumps(cfg)
    (ck / "config.json").write_text(text if garble is None else text[:garble])
    try:
        m = elutq.load(ck, max_ctx=16)
    except ElutqError:
        return
    logits = m.forward(elutq.runtime.Session(m), [1, 2, 3])
    assert np.isfinite(logits).all()


# ----------------------------------------------------------------------------- GGUF headers


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> bytes:
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(16)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    assert load_config(str(path)).num_hidden_layers == 1  # the unmutated file is read
    return data


@FAST
@given(cut=st.one_of(st.none(), st.integers(0, 2600)),
       flips=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=4))
def test_fuzz_gguf_header(small_gguf, tmp_path_factory, cut, flips):
    data = bytearray(small_gguf if cut is None else small_gguf[:cut])
    for pos, val in flips:
        if pos < len(data):
            data[pos] = val
    f = tmp_path_factory.getbasetemp() / f"g{next(_counter)}.gguf"
    f.write_bytes(bytes(data))
    try:
        config = load_config(str(f))
    except ElutqError:
        return
    assert config.model_type == "llama"


# ----------------------------------------------------------------------------- server request bodies


@pytest.fixture(scope="module")
def client(tiny_ckpt):
    from fastapi.testclient import TestClient

    from elutq.server import Engine, create_app

    model = elutq.load(tiny_ckpt, max_ctx=48)
    model.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    with TestClient(create_app(model, "tiny", Engine(model, max_batch=4, max_queue=8))) as c:
        yield c


ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                st.text(max_size=6), st.lists(st.integers(-1, 3), max_size=2), st.just({}))
SMALL = st.one_of(st.integers(-2, 6), ANY)
MESSAGE = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x", 3]),
                                           "content": st.one_of(st.text(max_size=20), ANY)}), ANY)
BODY = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "other", 5])},
    optional={
        "prompt": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=2), ANY),
        "messages": st.lists(MESSAGE, max_size=3),
        "max_tokens": SMALL, "max_completion_tokens": SMALL, "temperature": ANY, "top_p": ANY, "top_k": SMALL,
        "repetition_penalty": ANY, "seed": ANY, "stop": st.one_of(st.text(max_size=3), ANY), "n": SMALL,
        "stream": st.one_of(st.booleans(), ANY), "truncate": st.booleans(), "stream_options": ANY,
    },
)


VALIDISH = st.fixed_dictionaries(  # mostly well-formed: exercises the engine, not only the validation
    {"model": st.just("tiny"), "prompt": st.text(min_size=1, max_size=30),
     "messages": st.just([{"role": "user", "content": "fox"}]), "max_tokens": st.integers(-1, 5)},
    optional={"temperature": st.floats(-0.5, 2.5), "top_p": st.floats(-0.1, 1.1), "top_k": st.integers(-1, 300),
              "seed": st.integers(-3, 2**64), "repetition_penalty": st.floats(0, 3), "stream": st.booleans(),
              "stop": st.lists(st.text(max_size=2), max_size=3)},
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=st.one_of(BODY, VALIDISH), chat=st.booleans())
def test_fuzz_request_bodies(client, body, chat):
    r = client.post("/v1/chat/completions" if chat else "/v1/completions", content=json.dumps(body),
                    headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404, 413, 429), (r.status_code, r.text, body)
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"]
    assert client.get("/health").status_code == 200
