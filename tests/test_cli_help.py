"""``--help`` of every verb (issue 16, item 6): every flag has help text and shows its default, and ``--dtype`` lists
its choices (it was free text: a typo failed only after the model loaded)."""

from __future__ import annotations

import argparse

import pytest

from ppcl.cli.main import build_parser, main


def _verbs(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"{prefix}{name}"] = sub
                out.update(_verbs(sub, f"{prefix}{name} "))
    return out


VERBS = _verbs(build_parser())


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_flag_has_help_and_shows_its_default(verb: str) -> None:
    parser = VERBS[verb]
    assert parser.format_help()  # every help string formats (a stray % would raise here)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"{verb} {name} has no help text"
        default = action.default
        if action.option_strings and default not in (None, False, argparse.SUPPRESS) and not action.required:
            shown = formatter._get_help_string(action) or ""
            assert "default" in shown.lower(), f"{verb} {name} hides its default {default!r}"
    dtypes = [a for a in parser._actions if "--dtype" in a.option_strings]
    assert all(a.choices and {"float32", "bf16", "fp16"} <= set(a.choices) for a in dtypes), verb


def test_a_bad_dtype_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "--prompt", "x", "--out", "x.png", "--dtype", "bf17"])
    assert info.value.code == 2 and "invalid choice: 'bf17'" in capsys.readouterr().err
