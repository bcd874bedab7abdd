"""`chat_template:` in the spec: names, files and inline Jinja, checked at parse time and applied to the
tokenizer that renders every row."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import tiny_spec, write_spec
from trainers.chat_templates import LLAMA3, NAMED
from trainers.errors import SpecError
from trainers.models import load_tokenizer
from trainers.spec import load_spec

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def spec_with(tmp_path: Path, value: object):
    return load_spec(write_spec(tmp_path, tiny_spec(tmp_path, chat_template=value)))


def test_a_name_a_file_and_inline_jinja(tmp_path: Path) -> None:
    assert spec_with(tmp_path, "llama3").chat_template == "llama3"
    (tmp_path / "tpl.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    spec = spec_with(tmp_path, "tpl.jinja")  # beside the spec: read into the resolved spec
    assert spec.chat_template is not None and spec.chat_template.startswith("{% for m in messages %}")
    inline = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    assert spec_with(tmp_path, inline).chat_template == inline
    tok = load_tokenizer("bytes", chat_template=spec_with(tmp_path, inline).chat_template)
    assert tok.apply_chat_template(CHAT, tokenize=False) == "Be brief.|hi|"


def test_named_templates_render_their_family_markers() -> None:
    markers = {
        "llama3": "<|start_header_id|>user",
        "mistral": "[INST] Be brief.\n\nhi [/INST]",
        "zephyr": "<|user|>\nhi",
        "gemma": "<start_of_turn>user\nBe brief.\n\nhi",
        "phi3": "<|user|>\nhi<|end|>",
        "chatml": "<|im_start|>user\nhi<|im_end|>",
    }
    for name, marker in markers.items():
        tok = load_tokenizer("bytes", chat_template=name)
        text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        assert marker in text, (name, text)
    assert load_tokenizer("bytes", chat_template="llama3").chat_template == LLAMA3
    assert set(NAMED) >= set(markers)


def test_bad_values_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"chat_template: `lama3` is not a template name \(tokenizer, chatml"):
        spec_with(tmp_path, "lama3")
    with pytest.raises(SpecError, match=r"chat_template: not a valid Jinja template: .*template line 1"):
        spec_with(tmp_path, "{% for m in messages %}{{ m }}")
