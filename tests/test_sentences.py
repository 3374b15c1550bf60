"""pix2pix-zero's sentence sets from both caption-edit backends: the scene grammar (offline) and an
LLM over real HTTP (a local OpenAI-compatible server with scripted failures), plus the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llm_server import ScriptedLLM, pairs_reply, serve
from manip.ip2p.llm import LLMError, LLMSettings
from manip.ip2p.sentences import OpenAISentences, parse_pairs, recontext, rules_sentences, scene_sentences
from manip.models.tokenizer import TINY_MAX_LENGTH, build_clip_tokenizer
from manip.world import EDIT_KINDS, EditNotApplicable, apply_edit, caption, sample_scene, scene_rng

SECRET = "sk-test-DO-NOT-LEAK-0987654321"
FIELDS = ("background", "time", "style", "objects")


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer(max_length=TINY_MAX_LENGTH)


def edits_of_every_kind():
    out = {}
    for i in range(200):
        scene = sample_scene(scene_rng(3, "test", i), "test")
        for kind in EDIT_KINDS:
            if kind not in out:
                try:
                    out[kind] = apply_edit(scene, kind, np.random.default_rng(i))
                except EditNotApplicable:
                    pass
    assert set(out) == set(EDIT_KINDS)
    return out


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_recontext_keeps_exactly_the_edit_and_takes_the_rest_from_the_context(kind):
    edit = edits_of_every_kind()[kind]
    changed = {f for f in FIELDS if getattr(edit.source, f) != getattr(edit.target, f)}
    for i in range(20):
        context = sample_scene(scene_rng(5, "train", i), "train")
        src, tgt = recontext(edit, context)
        assert {f for f in FIELDS if getattr(src, f) != getattr(tgt, f)} == changed
        for f in FIELDS:
            if f in changed:
                assert (getattr(src, f), getattr(tgt, f)) == (getattr(edit.source, f), getattr(edit.target, f))
            else:
                assert getattr(src, f) == getattr(tgt, f) == getattr(context, f)


def test_rules_sentences_vary_the_context_and_are_reproducible():
    edit = edits_of_every_kind()["object"]
    src, tgt = rules_sentences(edit, 16, seed=4)
    assert (src, tgt) == rules_sentences(edit, 16, seed=4) and (src, tgt) != rules_sentences(edit, 16, seed=5)
    assert len(src) == len(tgt) == 16 and len(set(src)) > 8
    assert all(edit.before in a and edit.after in b for a, b in zip(src, tgt))
    with pytest.raises(ValueError, match="at least one"):
        rules_sentences(edit, 0, seed=4)
    own = scene_sentences(edit)
    assert own[0][0] == caption(edit.source) and own[1][0] == caption(edit.target) and len(set(own[0])) == 4


def _settings(url: str) -> LLMSettings:
    return LLMSettings(model="test-model", base_url=url, timeout=3.0, max_attempts=4, backoff=0.01)


def test_llm_sentences_over_a_hostile_endpoint(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    src, tgt = "a cat on a beach", "a dog on a beach"
    user = f"N: 5\ncaption: {src}\nedited caption: {tgt}\ninstruction: turn the cat into a dog"
    script = {user: ["500", "timeout", "429"], "N: 3\ncaption: x\nedited caption: y": ["malformed"] * 3}
    llm = ScriptedLLM(script, reply=pairs_reply)
    cache = tmp_path / "cache"
    with serve(llm) as url:
        writer = OpenAISentences(_settings(url), cache, tokenizer, sleep=lambda s: None)
        a, b = writer(src, tgt, "turn the cat into a dog", 5)
        assert llm.counts[user] == 4  # three failures retried, then the answer
        assert a == tuple(f"{src} scene {i}" for i in range(5)) and b == tuple(f"{tgt} scene {i}" for i in range(5))
        assert writer.dropped == ["pair 5: source and target are the same caption"]
        assert all(entry["authorization"] == f"Bearer {SECRET}" for entry in llm.log)

        again = OpenAISentences(_settings(url), cache, tokenizer)
        assert again(src, tgt, "turn the cat into a dog", 5) == (a, b) and again.endpoint.requests == 0

        with pytest.raises(LLMError, match="unusable answer: not JSON"):
            writer("x", "y", None, 3)
    for f in cache.rglob("*"):
        assert f.is_dir() or SECRET not in f.read_text()


def test_parse_pairs_rejects_junk_and_drops_bad_pairs(tokenizer):
    for junk, why in [("", "empty"), ("[1, 2]", "JSON object"), ('{"pairs": 3}', "list field"), ("nope", "not JSON")]:
        with pytest.raises(ValueError, match=why):
            parse_pairs(junk, tokenizer)
    long = " ".join(["cat"] * 200)
    parsed = parse_pairs(json.dumps({"pairs": [{"source": "a cat", "target": "a dog"}, {"source": long, "target": "x"},
                                               {"source": 1, "target": "x"}, {"source": " ", "target": "x"}]}),
                         tokenizer)
    assert parsed.pairs == (("a cat", "a dog"),)
    assert [d.split(":")[0] for d in parsed.dropped] == ["pair 1", "pair 2", "pair 3"]
    assert "over-long" in parsed.dropped[0] and "empty" in parsed.dropped[2]


def test_answer_without_a_usable_pair_is_an_error_naming_why(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    llm = ScriptedLLM(reply=lambda user: {"pairs": [{"source": "same", "target": "same"}]})
    with serve(llm) as url:
        with pytest.raises(LLMError, match="no usable pair.*same caption"):
            OpenAISentences(_settings(url), tmp_path, tokenizer)("a", "b", None, 2)


def test_cli_writes_the_sentence_files(monkeypatch, tmp_path, tokenizer, capsys):
    from manip.cli import main

    tokenizer.save_pretrained(tmp_path / "tok")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    llm = ScriptedLLM(reply=pairs_reply)
    with serve(llm) as url:
        args = ["sentences", "--source", caption(edits_of_every_kind()["colour"].source), "--target", "a blue ball",
                "--n", "3", "--base-url", url, "--tokenizer", str(tmp_path / "tok"), "--cache", str(tmp_path / "c"),
                "--out-dir", str(tmp_path / "out")]
        assert main(args) == 0
        report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 3 and report["requests"] == 1
    assert (tmp_path / "out" / "target.txt").read_text().splitlines() == [f"a blue ball scene {i}" for i in range(3)]
    monkeypatch.delenv("OPENAI_API_KEY")
    assert main(args) == 2 and "OPENAI_API_KEY" in capsys.readouterr().err


def test_sentence_llm_defaults_survive_a_partial_override():
    from stages.params import SentencesParams

    o = SentencesParams(backend="openai", openai={"base_url": "http://127.0.0.1:9/v1"}).openai
    assert (o.max_tokens, o.cache_dir, o.base_url) == (2000, ".cache/llm-sentences", "http://127.0.0.1:9/v1")


def test_russian_sentence_sets_from_the_rules_and_an_llm(monkeypatch, tmp_path):
    from manip.multilingual import caption_ru, detect_language

    edit = edits_of_every_kind()["object"]
    src, tgt = rules_sentences(edit, 16, seed=4, language="ru")
    assert all(detect_language(s) == "ru" for s in (*src, *tgt))
    english = rules_sentences(edit, 16, seed=4)
    assert len(set(src)) == len(set(english[0]))  # the same contexts, written in Russian
    own = scene_sentences(edit, "ru")
    assert own[0][0] == caption_ru(edit.source) and own[1][0] == caption_ru(edit.target)

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    answer = {"pairs": [{"source": "кошка в городе", "target": "собака в городе"},
                        {"source": "a cat in the city", "target": "a dog in the city"}]}
    llm = ScriptedLLM(reply=lambda user: answer)
    with serve(llm) as url:
        sentences = OpenAISentences(_settings(url), tmp_path)
        assert sentences(caption_ru(edit.source), caption_ru(edit.target), None, 2) == (("кошка в городе",),
                                                                                         ("собака в городе",))
    assert sentences.dropped == ["pair 1: not written in Russian"]
    assert "language: Russian" in llm.log[0]["caption"]
