"""Errors raised by ppcl.

Every error a user can trigger with bad input is a :class:`PPCLError`. Its message always says what was expected,
what was found, and what to do about it, so the CLI can print it as one line and exit with code 2.
"""

from __future__ import annotations


class PPCLError(Exception):
    """Base class of every error ppcl raises on purpose.

    Args:
        what: one sentence naming the problem.
        expected: what ppcl needed.
        found: what it got instead.
        fix: what the user should do.
    """

    def __init__(self, what: str, *, expected: str | None = None, found: str | None = None, fix: str | None = None):
        self.what = what
        self.expected = expected
        self.found = found
        self.fix = fix
        parts = [what.rstrip(".") + "."]
        if expected is not None:
            parts.append(f"Expected: {expected}.")
        if found is not None:
            parts.append(f"Found: {found}.")
        if fix is None and expected is not None:
            # Every message a user sees says what to do; an error raised without a specific fix gets the generic one.
            fix = "change the input to what is expected"
        if fix is not None:
            parts.append(f"Fix: {fix}.")
        super().__init__(" ".join(parts))


class UnsupportedModelError(PPCLError):
    """The model class has no ArchSpec."""


class ConfigError(PPCLError):
    """A configuration value or argument is out of range or inconsistent."""


class ArtefactError(PPCLError):
    """An artefact folder (calibration set, report, plan, add-on, weights) is missing, malformed or corrupt."""


class AddonMismatchError(ArtefactError):
    """An add-on was made for another base model."""


class TrainingError(PPCLError):
    """Training cannot continue (NaN/Inf loss, diverged run)."""
