"""Caption sources, caption screening and both caption-edit backends (rules offline, openai over
real HTTP against a local OpenAI-compatible server with scripted failures)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from llm_server import ScriptedLLM, edited, serve
from manip.ip2p import (Caption, RulesEditor, jsonl_captions, read_jsonl, screen, world_captions, write_jsonl)
from manip.ip2p.captions import CaptionSourceError, dataset_captions
from manip.ip2p.llm import LLMError, LLMSettings, OpenAIEditor, load_examples, parse_answer, pick_examples
from manip.ip2p.records import CaptionEdit
from manip.models.tokenizer import TINY_MAX_LENGTH, build_clip_tokenizer
from manip.world import EDIT_KINDS, Scene, caption, sample_scene, scene_rng

SECRET = "sk-test-DO-NOT-LEAK-1234567890"


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer(max_length=TINY_MAX_LENGTH)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [sample_scene(scene_rng(7, "train", i), "train") for i in range(300)]


# ---------------------------------------------------------------- captions


def test_world_captions_are_deterministic_and_use_every_phrasing(scenes):
    a, b = world_captions(scenes, 0, 200), world_captions(scenes, 0, 200)
    assert a == b and len(a) == 200
    assert {c.phrasing for c in a} == {0, 1, 2, 3}
    for c in a[:20]:
        assert c.text == caption(Scene.from_dict(c.scene), c.phrasing)
    assert [c.phrasing for c in world_captions(scenes, 1, 200)] != [c.phrasing for c in a]


def test_bad_captions_are_rejected_with_the_reason(tmp_path, tokenizer):
    path = tmp_path / "captions.jsonl"
    lines = [json.dumps({"id": "ok", "caption": "  a red  cat on the grass "}).encode(),
             json.dumps({"id": "empty", "caption": "   "}).encode(),
             json.dumps({"id": "long", "caption": "cat " * 40}).encode(),
             json.dumps({"id": "num", "caption": 42}).encode(),
             json.dumps({"id": "ok", "caption": "a repeated id"}).encode(),
             json.dumps({"id": "nofield", "text": "a dog"}).encode(),
             b'{"id": "latin1", "caption": "caf\xe9"}',
             b"{not json",
             b"[1, 2]",
             b""]
    path.write_bytes(b"\n".join(lines) + b"\n")
    raw, unreadable = jsonl_captions(path)
    kept, rejected = screen(raw, tokenizer)
    assert [(c.id, c.text) for c in kept] == [("ok", "a red cat on the grass")]
    reasons = {r.id: r.reason for r in unreadable + rejected}
    assert reasons["empty"] == "empty" and reasons["long"] == "over-long" and reasons["num"] == "not text"
    assert reasons["line-0000006"] == "no caption"
    assert Counter(reasons.values())["unreadable"] == 3  # non-UTF-8, not JSON, not an object
    assert any("UTF-8" in r.detail for r in unreadable)
    assert [r.reason for r in rejected if r.id == "ok"] == ["duplicate id"]


def test_jsonl_source_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="caption file"):
        jsonl_captions(tmp_path / "nope.jsonl")


def test_dataset_text_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a cat", ""], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    kept, rejected = screen(dataset_captions(str(tmp_path / "ds"), "text"))
    assert [c.text for c in kept] == ["a cat"] and [r.reason for r in rejected] == ["empty"]
    with pytest.raises(CaptionSourceError, match="no column 'caption'"):
        dataset_captions(str(tmp_path / "ds"), "caption")
    with pytest.raises(CaptionSourceError, match="could not be loaded offline"):
        dataset_captions("no-such-org/no-such-dataset", "text")


# ---------------------------------------------------------------- rules backend


def test_rules_edits_cover_every_kind_with_ground_truth(scenes, tokenizer):
    captions = world_captions(scenes, 0, 300)
    edits, rejected = RulesEditor(0).edit_all(captions)
    assert not rejected and len(edits) == 300
    assert {e.kind for e in edits} == set(EDIT_KINDS)
    phrasing = {c.id: c.phrasing for c in captions}
    for e in edits:
        assert e.output != e.input and e.edit
        source, target = Scene.from_dict(e.truth["source"]), Scene.from_dict(e.truth["target"])
        assert caption(source, phrasing[e.id]) == e.input and caption(target, phrasing[e.id]) == e.output
    per_kind = {k: {e.edit.split()[0] for e in edits if e.kind == k} for k in EDIT_KINDS}
    assert all(len(verbs) >= 2 for verbs in per_kind.values()), per_kind  # varied phrasing
    assert RulesEditor(0).edit_all(captions) == (edits, rejected)
    assert RulesEditor(1).edit_all(captions)[0] != edits


def test_rules_balanced_kinds(scenes):
    edits, _ = RulesEditor(0).edit_all(world_captions(scenes, 0, 140), balanced=True)
    counts = Counter(e.kind for e in edits)
    assert set(counts) == set(EDIT_KINDS) and min(counts.values()) >= 10, counts


def test_rules_backend_rejects_free_text():
    edits, rejected = RulesEditor(0).edit_all([Caption("x", "a cat on a sofa")])
    assert not edits and rejected[0].reason == "no scene"
    with pytest.raises(ValueError, match="unknown edit kinds"):
        RulesEditor(0, ["recolour"])


def test_records_round_trip_sorted(tmp_path):
    rows = [CaptionEdit("b", "x", "e", "y"), CaptionEdit("a", "x", "e", "z", "time", {"k": 1})]
    write_jsonl(tmp_path / "e.jsonl", rows)
    assert read_jsonl(tmp_path / "e.jsonl", CaptionEdit) == sorted(rows, key=lambda r: r.id)


# ---------------------------------------------------------------- openai backend


def test_shipped_examples_cover_every_kind():
    examples = load_examples()
    assert len(examples) >= 100
    kinds = Counter(e["kind"] for e in examples)
    assert len(kinds) >= 10 and min(kinds.values()) >= 5
    assert all(e["output"] != e["input"] for e in examples)
    picked = pick_examples(examples, 13)
    assert len({e["kind"] for e in picked}) == 13


@pytest.mark.parametrize("content, reason", [
    ("", "malformed"), ("nope", "malformed"), ("[1]", "malformed"), ('{"edit": "x"}', "malformed"),
    ('{"edit": "x", "output": "A cat."}', "unchanged"), ('{"edit": "x", "output": "' + "dog " * 40 + '"}', "output over-long"),
])
def test_parse_answer_rejects_junk(content, reason, tokenizer):
    edit, why = parse_answer(content, "a cat", tokenizer)
    assert edit is None and why[0] == reason


def test_parse_answer_accepts_fenced_json():
    assert parse_answer('```json\n{"edit": "e", "output": "a dog"}\n```', "a cat") == ("e", "a dog")


def _settings(url: str, **kw) -> LLMSettings:
    return LLMSettings(model="test-model", base_url=url, timeout=3.0, max_attempts=3, backoff=0.01,
                       concurrency=3, n_examples=4, **kw)


def test_openai_backend_needs_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(LLMError, match="OPENAI_API_KEY"):
        OpenAIEditor(_settings("http://127.0.0.1:9/v1"), tmp_path)


def test_openai_backend_survives_a_hostile_endpoint(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    script = {
        "c ok": [], "c timeout once": ["timeout"], "c 500 twice": ["500", "500"], "c 429": ["429"],
        "c malformed": ["malformed"], "c fenced": ["fenced"], "c unchanged": ["unchanged"], "c empty": ["empty"],
        "c always 500": ["500"] * 10, "c 400": ["400"], "c no choices": ["nochoices"],
    }
    captions = [Caption(f"id-{i}", text) for i, text in enumerate(script)]
    llm = ScriptedLLM(script)
    cache = tmp_path / "cache"
    with serve(llm) as url:
        editor = OpenAIEditor(_settings(url), cache, tokenizer)
        edits, rejected = editor.edit_all(captions, progress=False)
        # ok, malformed, fenced, unchanged, empty, 400, no choices: 1 each (a refusal is not retried);
        # timeout once and 429: 2; 500 twice and always 500: 3.
        assert editor.requests == 7 + 2 * 2 + 2 * 3

        by_id = {c.id: c.text for c in captions}
        assert {e.id for e in edits} | {r.id for r in rejected} == set(by_id)  # every item accounted for
        kept = {by_id[e.id] for e in edits}
        assert kept == {"c ok", "c timeout once", "c 500 twice", "c 429", "c fenced"}
        assert all(e.output == edited(e.input)["output"] for e in edits)
        reasons = {by_id[r.id]: r.reason for r in rejected}
        assert reasons == {"c malformed": "malformed", "c unchanged": "unchanged", "c empty": "malformed",
                           "c always 500": "endpoint failed", "c 400": "endpoint failed",
                           "c no choices": "endpoint failed"}
        details = {by_id[r.id]: r.detail for r in rejected}
        assert "HTTP 400" in details["c 400"] and "no choices" in details["c no choices"]
        assert llm.counts["c always 500"] == 3 and llm.counts["c 500 twice"] == 3 and llm.counts["c ok"] == 1
        assert all(entry["authorization"] == f"Bearer {SECRET}" for entry in llm.log)  # the real client path
        assert all(entry["path"] == "/v1/chat/completions" for entry in llm.log)
        assert llm.log[0]["body"]["response_format"] == {"type": "json_object"}
        assert len(llm.log[0]["body"]["messages"]) == 2 + 2 * 4

        # A rerun answers from the cache: only the captions that never got an answer are asked again,
        # and the two the endpoint now takes join the edits.
        again = OpenAIEditor(_settings(url), cache, tokenizer)
        edits2, rejected2 = again.edit_all(captions)
        assert again.requests == 3 + 1 + 1
        assert {by_id[e.id] for e in edits2} == kept | {"c 400", "c no choices"}
        assert sorted(rejected2, key=lambda r: r.id) == sorted(
            (r for r in rejected if by_id[r.id] not in ("c 400", "c no choices")), key=lambda r: r.id)

    out = tmp_path / "out"
    write_jsonl(out / "edits.jsonl", edits)
    write_jsonl(out / "rejected.jsonl", rejected)
    cached = list(cache.rglob("*.json"))
    assert len(cached) == len(captions) - 1  # the failure left is not cached, so a rerun retries it
    for f in [*cached, *out.iterdir()]:
        assert SECRET not in f.read_text()
    assert all(SECRET not in r.detail for r in rejected)


def test_an_endpoint_that_refuses_every_request_stops_the_run(monkeypatch, tmp_path, tokenizer, capsys):
    """A wrong key (or base URL, or model) fails every caption alike: one clear error naming the
    status, never the key the server echoed back."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    llm = ScriptedLLM({"c wrong key": ["401"] * 10})
    with serve(llm) as url:
        editor = OpenAIEditor(_settings(url), tmp_path / "cache", tokenizer)
        with pytest.raises(LLMError, match="HTTP 401") as err:
            editor.edit_all([Caption("id-0", "c wrong key")])
    assert SECRET not in str(err.value) and "OPENAI_API_KEY" in str(err.value)
    assert llm.counts["c wrong key"] == 1 and not list((tmp_path / "cache").rglob("*.json"))


def test_unreadable_examples_file_is_named(tmp_path):
    bad = tmp_path / "examples.jsonl"
    bad.write_text('{"input": "a cat", "edit": "make it a dog"}\n')
    with pytest.raises(LLMError, match="example 1 needs non-empty input, edit and output"):
        load_examples(bad)
    bad.write_text("not json\n")
    with pytest.raises(LLMError, match="not a readable JSONL file"):
        load_examples(bad)
    with pytest.raises(LLMError, match="not a readable JSONL file"):
        load_examples(tmp_path / "missing.jsonl")


def test_cache_key_follows_model_and_template(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    a = OpenAIEditor(_settings("http://127.0.0.1:9/v1"), tmp_path)
    b = OpenAIEditor(LLMSettings(model="other", base_url="http://127.0.0.1:9/v1", n_examples=4), tmp_path)
    c = OpenAIEditor(_settings("http://127.0.0.1:9/v1", temperature=0.1), tmp_path)
    assert len({a.key("x"), b.key("x"), c.key("x")}) == 3 and a.key("x") != a.key("y")
    assert SECRET not in a.endpoint.template


def test_item_rng_depends_only_on_identity():
    from manip.ip2p.records import item_rng

    assert item_rng(0, "a", 1).integers(1 << 30) == item_rng(0, "a", 1).integers(1 << 30)
    draws = {int(item_rng(s, k, i).integers(1 << 30)) for s in (0, 1) for k in ("a", "b") for i in (0, 1)}
    assert len(draws) == 8


# ---------------------------------------------------------------- Russian captions and edits


def test_russian_world_captions_and_rules_edits(scenes):
    from manip.multilingual import caption_ru, detect_language

    captions = world_captions(scenes, 0, 140, language="ru")
    assert [c.phrasing for c in captions] == [c.phrasing for c in world_captions(scenes, 0, 140)]
    assert all(c.text == caption_ru(Scene.from_dict(c.scene), c.phrasing) for c in captions)
    edits, rejected = RulesEditor(0).edit_all(captions, balanced=True)
    assert not rejected and {e.kind for e in edits} == set(EDIT_KINDS)
    phrasing = {c.id: c.phrasing for c in captions}
    for e in edits:
        assert detect_language(e.edit) == "ru" and detect_language(e.output) == "ru", e
        assert caption_ru(Scene.from_dict(e.truth["target"]), phrasing[e.id]) == e.output
    # The same edits as in English: only the words differ.
    english, _ = RulesEditor(0).edit_all(world_captions(scenes, 0, 140), balanced=True)
    assert [(e.id, e.kind, e.truth) for e in edits] == [(e.id, e.kind, e.truth) for e in english]
    swaps = {e.edit for e in edits if e.kind == "object"}
    assert any(s.startswith(("замени ", "преврати ")) for s in swaps)
    by_id = {e.id: e for e in edits}
    assert any(e.edit.endswith("цвет") for e in by_id.values() if e.kind == "colour")


def test_rules_instructions_use_the_accusative():
    from manip.ip2p.rules import instruction_ru
    from manip.world import Placed
    from manip.world.edits import Edit

    source = Scene(objects=(Placed("cat", "natural", "left"), Placed("cat", "red", "right")), background="beach",
                   time="day", style="photo")
    target = source.with_(objects=(Placed("dog", "natural", "left"), source.objects[1]))
    said = {instruction_ru(Edit("object", "cat", "dog", source, target), np.random.default_rng(i)) for i in range(20)}
    assert said == {"замени кошку слева на собаку", "преврати кошку слева в собаку"}


def test_rules_backend_rejects_a_caption_in_no_supported_language(scenes):
    c = world_captions(scenes, 0, 1)[0]
    _, rejected = RulesEditor(0).edit_all([Caption(c.id, "一只猫", c.scene, c.phrasing)])
    assert rejected[0].reason == "language" and "unsupported script" in rejected[0].detail


def test_shipped_russian_examples_and_the_language_in_the_prompt(monkeypatch, tmp_path):
    from manip.ip2p.llm import examples_by_language

    grouped = examples_by_language(load_examples())
    assert set(grouped) == {"en", "ru"} and len(grouped["ru"]) >= 20
    assert {e["kind"] for e in grouped["ru"]} == {e["kind"] for e in grouped["en"]}
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    editor = OpenAIEditor(_settings("http://127.0.0.1:9/v1"), tmp_path)
    ru = editor.messages("красная кошка на пляже")
    assert "write the edit and the output in Russian" in ru[0]["content"]
    assert all(detect(m["content"]) == "ru" for m in ru[1:])
    en = editor.messages("a red cat on the beach")
    assert "Russian" not in en[0]["content"] and all(detect(m["content"]) == "en" for m in en[1:])
    assert editor.key("красная кошка на пляже") != editor.key("a red cat on the beach")


def detect(content: str) -> str:
    from manip.multilingual import detect_language

    try:
        return detect_language(" ".join(json.loads(content).values()))
    except json.JSONDecodeError:
        return detect_language(content)


def test_openai_backend_edits_russian_captions_and_quarantines_other_languages(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)

    def reply(caption: str) -> dict:
        if caption.startswith("синий"):  # answers in English to a Russian caption
            return {"edit": "make it night", "output": "a blue house at night"}
        return {"edit": "сделай ночь", "output": f"{caption} ночью"}

    captions = [Caption("a", "красный дом на холме"), Caption("b", "синий дом на холме"),
                Caption("c", "a red cat and кошка")]
    llm = ScriptedLLM(reply=reply)
    with serve(llm) as url:
        edits, rejected = OpenAIEditor(_settings(url), tmp_path / "cache").edit_all(captions)
    assert [(e.id, e.edit, e.output) for e in edits] == [("a", "сделай ночь", "красный дом на холме ночью")]
    reasons = {r.id: (r.reason, r.detail) for r in rejected}
    assert reasons["b"][0] == "wrong language" and "in English, the caption in Russian" in reasons["b"][1]
    assert reasons["c"][0] == "language" and "mixes" in reasons["c"][1]
    asked = {entry["caption"] for entry in llm.log}
    assert asked == {"красный дом на холме", "синий дом на холме"}  # the mixed caption is never sent
    assert all("in Russian" in entry["body"]["messages"][0]["content"] for entry in llm.log)
