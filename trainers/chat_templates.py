"""Chat templates a spec can name (`chat_template: llama3`), or give as a file or inline Jinja.

The template renders every training row and every before/after prompt, and it is saved with the artifact
(the tokenizer files and the manifest), so `fulcrum serve` formats requests the way the model was trained.
The names follow the model families' own templates (as LLaMA-Factory's `template:` and Axolotl's
`chat_template:` do); `tokenizer` keeps the tokenizer's own.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral / Llama-2 instruct: a system message goes in front of the first user turn.
MISTRAL = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Gemma has no system role: a system message is folded into the first user turn, as Gemma's own does.
GEMMA = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + ns.system + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% set ns.system = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

NAMED = {
    "chatml": CHATML,
    "qwen": CHATML,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "llama2": MISTRAL,
    "zephyr": ZEPHYR,
    "gemma": GEMMA,
    "phi3": PHI3,
}
KEEP = "tokenizer"  # the tokenizer's own template (ChatML when it has none)


def is_inline(value: str) -> bool:
    return "{{" in value or "{%" in value


def template_text(value: str | None) -> str | None:
    """The Jinja text of a spec's `chat_template` (a name or inline text; files were read at parse time);
    None keeps the tokenizer's own."""
    if value is None or value == KEEP:
        return None
    return NAMED.get(value, value)


def resolve(value: str, spec_dir: Path) -> tuple[str | None, str | None]:
    """(the value to keep in the resolved spec, a problem): a name stays a name, a file becomes its text,
    inline Jinja stays; the text must compile as Jinja."""
    if value == KEEP or value in NAMED:
        return value, None
    text = value
    if not is_inline(value):
        path = Path(value).expanduser()
        path = path if path.is_absolute() or path.exists() else spec_dir / path
        if not path.is_file():
            names = ", ".join([KEEP, *NAMED])
            return None, (
                f"`{value}` is not a template name ({names}), a file, or inline Jinja "
                "(text with {{ }} or {% %})"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return None, f"cannot read {path}: {e}"
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        return None, f"not a valid Jinja template: {e.message} (template line {e.lineno})"
    return text, None
