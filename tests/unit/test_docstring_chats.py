"""The demo's synthetic SFT source: one question/answer exchange per documented public API of the stdlib."""

from __future__ import annotations

import ast

from prolong_lit.data.sources import (
    CHAT_QUESTIONS,
    CHAT_SOURCE_TYPES,
    Conversation,
    SourceConfig,
    iter_documents,
    public_api_summaries,
    stdlib_dir,
    validate_source,
)

CODE = '''
"""Module docstring: not an API."""

def encode(obj):
    """Serialize obj to a JSON formatted str.

    The second paragraph is not part of the answer."""

def _private(x):
    """A private helper is never asked about."""

def terse():
    """Return self."""

class Decoder:
    """Simple JSON decoder that turns text into objects."""

    def decode(self, s):
        """Return the Python representation of s."""

    def _scan(self):
        """Private method, skipped."""

    def __repr__(self):
        """Dunder methods are private too."""

    def undocumented(self):
        pass
'''


def test_public_api_summaries_first_paragraph_of_public_names():
    assert list(public_api_summaries(CODE)) == [
        ("encode", "Serialize obj to a JSON formatted str."),
        ("Decoder", "Simple JSON decoder that turns text into objects."),
        ("Decoder.decode", "Return the Python representation of s."),
    ]
    assert list(public_api_summaries("def broken(:\n")) == []  # source that does not parse gives nothing


def test_stdlib_chats_ask_about_module_names_and_answer_with_the_docstring():
    source = SourceConfig(type="python_docstring_chats", pattern="json/*.py")
    validate_source(source, "domains.chats.sources[0]")
    chats = list(iter_documents(source))
    assert "python_docstring_chats" in CHAT_SOURCE_TYPES
    assert chats and all(isinstance(c, Conversation) for c in chats)
    assert chats == list(iter_documents(source))  # deterministic: same questions on every run
    by_name = {c.messages[0]["content"]: c.messages[1]["content"] for c in chats}
    # json.dumps's answer is the first paragraph of its docstring, read independently with ast
    tree = ast.parse((stdlib_dir() / "json" / "__init__.py").read_text())
    dumps = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "dumps")
    expected = ast.get_docstring(dumps).split("\n\n")[0].strip()
    questions = [q.format(name="json.dumps") for q in CHAT_QUESTIONS]
    assert sum(q in by_name for q in questions) == 1
    assert by_name[next(q for q in questions if q in by_name)] == expected
    for chat in chats:
        user, assistant = chat.messages
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert "`json." in user["content"] and "._" not in user["content"]  # private modules and names skipped
        assert len(assistant["content"].split()) >= 3
