"""Credentials out of everything a run writes or pushes: by key (``hub_token``, ``passwd``, ``auth``, ``headers``...)
and by shape (URL userinfo, signed-URL query parameters, HTTP auth schemes, well-known token prefixes) under any key.

huggingface_hub has no public helper for this (its ``utils._http._redact_sensitive_body`` is private and covers
only OAuth request bodies), so the patterns live here."""

from __future__ import annotations

import copy
import copyreg
import dataclasses
import re

CREDENTIAL = re.compile(
    r"token|secret|key|passw|pwd|credential|bearer|auth(?!or)|signature|(^|[_-])sig($|[_-])", re.IGNORECASE
)
# Keys whose whole value is a credential or carries one (a proxy URL with a password, an Authorization header).
CREDENTIAL_CONTAINER = re.compile(r"^(.*[_-])?(auth|authorization|headers?|proxies|proxy|cookies?)$", re.IGNORECASE)
# Values shaped like a credential under any key: URL userinfo, a signed URL's query, HTTP auth schemes, well-known
# token prefixes.
SECRET_SHAPES = re.compile(
    r"[a-z][a-z0-9+.-]*://[^/@\s]+@"  # scheme://user:password@host
    r"|[?&](sig|signature|token|access_token|api_key|apikey|key|password|x-amz-signature|x-amz-security-token"
    r"|x-goog-signature)=[^&#\s]+"  # https://host/file?sv=...&sig=... (Azure SAS, S3 and GCS signed URLs)
    r"|\b(Bearer|Basic|Token)\s+\S+"
    r"|\b(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|sk-[A-Za-z0-9_-]{20,}|xox[abprs]-[\w-]+"
    r"|AKIA[0-9A-Z]{16})",
    re.IGNORECASE,
)
REDACTED = "<redacted>"


def redact(value):
    """``value`` with every credential replaced, at any depth of dicts and lists: what may be written to disk or
    pushed. A credential is a string under a key naming a token, secret, key, password (``passwd``, ``pwd``),
    bearer, auth or signature; anything under ``auth``, ``*headers``, ``proxies`` or ``cookies``; or a string
    shaped like one under any key (a URL with a user and password or a signature in its query, a
    ``Bearer``/``Basic`` value, a Hub, GitHub, OpenAI, Slack or AWS key)."""
    if isinstance(value, dict):
        return {k: _redact_item(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str) and SECRET_SHAPES.search(value):
        return REDACTED
    return value


def redact_text(text: str) -> str:
    """``text`` (a path or URL in a message) with each credential-shaped part replaced: the user and password of a
    URL, a signed query parameter's value, an auth scheme's value, a token."""
    return SECRET_SHAPES.sub(_hide, text)


def _hide(match: re.Match) -> str:
    found = match.group(0)
    if "://" in found:  # keep the scheme and the host: the message still says which URL
        return found.split("://", 1)[0] + f"://{REDACTED}@"
    if found[0] in "?&":
        return found.split("=", 1)[0] + f"={REDACTED}"
    return REDACTED


def _redact_item(key: str, value):
    if CREDENTIAL_CONTAINER.match(key) and value is not None:
        return REDACTED
    if CREDENTIAL.search(key) and isinstance(value, str):
        return REDACTED
    return redact(value)


def redacted_fields(args) -> dict:
    """The fields of training arguments (a dataclass) that hold credentials, redacted: ``None`` for a string field
    named like a token, secret, key or password (``hub_token``), dict fields redacted (``model_init_kwargs``)."""
    clean = {}
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if CREDENTIAL.search(field.name) and isinstance(value, str):
            clean[field.name] = None
        elif isinstance(value, dict):
            clean[field.name] = redact(value)
    return clean


def redacted_args(args):
    """A copy of training arguments without credentials (``redacted_fields``): what ``training_args.bin``, which
    the Trainer pickles and ``push_to_hub`` uploads, may hold."""
    clean = copy.copy(args)
    for name, value in redacted_fields(args).items():
        setattr(clean, name, value)
    return clean


class PicklesRedacted:
    """Training arguments whose pickle holds no credential (``redacted_fields``), as ``pickled_as`` (default: their
    own class): the Trainer pickles its args into the ``training_args.bin`` of every save and of every checkpoint
    push (``_push_from_checkpoint`` writes it beside the pushed files, outside ``_save``), ``hub_token`` included.
    The object itself keeps its credentials: the push needs the token."""

    pickled_as: type | None = None

    def __reduce_ex__(self, protocol):
        # The reconstructor of pickle protocols 0-1 (stdlib): no class of this package is needed to load the file
        # when ``pickled_as`` is a transformers class.
        cls = self.pickled_as or type(self)
        return copyreg._reconstructor, (cls, object, None), {**vars(self), **redacted_fields(self)}
