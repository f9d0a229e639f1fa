"""Tokenize the dataset formats users already have, as TRL's ``SFTTrainer`` names them, for the bilevel losses.

A dataset's format is read from its columns:

- language modelling: a text column (``dataset_text_field``, default ``"text"``); loss on every token;
- prompt-completion: ``prompt`` and ``completion``; loss on the completion only. Both may also be lists of
  chat messages (conversational prompt-completion), rendered with the tokenizer's chat template;
- conversational: ``messages`` (``{"role", "content"}`` dicts), rendered with the chat template; loss on the
  assistant turns.

Rows keep their own length (the collator pads each batch). A row longer than ``max_length`` tokens is, by
``truncation_mode``: cut at the end (``keep_start``, as TRL does), cut at the start so the completion survives
(``keep_end``), or dropped (``drop``); a warning counts them, since cutting can remove exactly the tokens that
carry the loss.
"""

from __future__ import annotations

import warnings

from hf_fg2u.registry import check_choice

IGNORE_INDEX = -100  # a label the loss skips (the prompt, padding)
TRUNCATION_MODES = ("keep_start", "keep_end", "drop")
FORMAT_COLUMNS = {"conversational": ("messages",), "prompt_completion": ("prompt", "completion")}
MODEL_INPUT_COLUMNS = ("input_ids", "attention_mask", "labels")


def dataset_format(column_names, text_field: str = "text") -> str:
    """``"conversational"``, ``"prompt_completion"`` or ``"language_modeling"``, from the column names."""
    for name, columns in FORMAT_COLUMNS.items():
        if all(c in column_names for c in columns):
            return name
    if text_field in column_names:
        return "language_modeling"
    raise ValueError(
        f"has no 'input_ids' column and no column to tokenize (columns: {list(column_names)}). Give it a "
        f"{text_field!r} column (plain text; or set dataset_text_field=), 'prompt' + 'completion', or 'messages' "
        "(chat), or tokenize it yourself (input_ids, attention_mask, labels)."
    )


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "Conversational data needs a tokenizer with a chat template, and this tokenizer has none. Set "
            "tokenizer.chat_template, or give the data as 'text' or 'prompt' + 'completion' strings."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_segments(tokenizer, messages: list[dict], trained_roles=("assistant",)) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces: each assistant turn is the text its message adds
    after the rendering of the turns before it with the generation prompt."""
    segments, done = [], ""
    for index, message in enumerate(messages):
        if message.get("role") not in trained_roles:
            continue
        prompt = _render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        turn = _render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not turn.startswith(prompt):
            raise ValueError(
                "The tokenizer's chat template does not render a conversation as a prefix of its continuation, "
                "so the assistant turns cannot be located. Use a template that does, or pass prompt + completion."
            )
        segments += [(prompt[len(done) :], False), (turn[len(prompt) :], True)]
        done = turn
    whole = _render_chat(tokenizer, messages, add_generation_prompt=False)
    segments.append((whole[len(done) :], False))
    return [(text, trained) for text, trained in segments if text]


def _segments(example: dict, tokenizer, kind: str, text_field: str) -> tuple[list[tuple[str, bool]], bool]:
    """(text, trained) pieces of one example, and whether they are plain text (so the tokenizer adds its own
    special tokens and an end-of-sequence token is trained at the end)."""
    if kind == "conversational":
        return _chat_segments(tokenizer, example["messages"]), False
    if kind == "prompt_completion":
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, list):
            head = _render_chat(tokenizer, prompt, add_generation_prompt=True)
            whole = _render_chat(tokenizer, prompt + completion, add_generation_prompt=False)
            if not whole.startswith(head):
                raise ValueError("The chat template does not render the prompt as a prefix of prompt + completion.")
            return [(head, False), (whole[len(head) :], True)], False
        return [(prompt, False), (completion, True)], True
    return [(example[text_field], True)], True


def shared_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def encode_example(example: dict, tokenizer, kind: str, text_field: str = "text") -> dict[str, list[int]]:
    """One example -> unpadded ``input_ids``, ``attention_mask``, ``labels`` (-100 where no loss is taken), and
    ``boundary_merged``: whether the tokenizer joined text across a prompt/answer boundary.

    The whole text is tokenized at once, as the model reads it at inference ("Answer: " + "Paris" is
    ``ĠParis``, not ``Ġ`` + ``Paris``). A piece ends after the tokens that the text up to its end shares with
    the whole; a token that straddles the boundary goes to the piece it ends in, so an answer keeps it.
    """
    segments, plain = _segments(example, tokenizer, kind, text_field)
    whole = "".join(text for text, _ in segments)
    input_ids = tokenizer(whole, add_special_tokens=plain)["input_ids"]
    labels, start, prefix, merged = [], 0, "", False
    for index, (text, trained) in enumerate(segments):
        prefix += text
        if index == len(segments) - 1:
            end = len(input_ids)
        else:
            head = tokenizer(prefix, add_special_tokens=plain)["input_ids"]
            end = shared_prefix_length(head, input_ids)
            merged = merged or end < len(head)
            end = max(end, start)
        labels += input_ids[start:end] if trained else [IGNORE_INDEX] * (end - start)
        start = end
    eos = tokenizer.eos_token_id
    if plain and eos is not None and input_ids[-1:] != [eos]:
        input_ids, labels = input_ids + [eos], labels + [eos]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels,
            "boundary_merged": merged}  # fmt: skip


def tokenize_dataset(
    dataset, tokenizer, max_length: int | None, role: str, text_field: str = "text", truncation_mode: str = "keep_start"
):
    """Tokenize a raw ``dataset`` of any supported format (see the module docstring); rows longer than
    ``max_length`` tokens are cut or dropped by ``truncation_mode``, with a warning that counts them. The format's own
    columns are replaced by ``input_ids``/``attention_mask``/``labels``; every other column is kept."""
    check_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
    kind = raw_format(dataset, role, text_field)
    if tokenizer is None:
        raise ValueError(
            f"The {role} dataset is raw {kind} data, and no tokenizer was given: pass processing_class=tokenizer "
            "to BilevelTrainer, or tokenize the data yourself."
        )
    source = FORMAT_COLUMNS.get(kind, (text_field,))
    check_raw_values(dataset, kind, source, role, text_field)
    if kind != "language_modeling" and text_field in dataset.column_names:
        warnings.warn(
            f"The {role} dataset has both {'/'.join(source)} and {text_field!r} columns: the {kind} format is used "
            f"and {text_field!r} is not read. Drop one of them to make the choice yours.",
            stacklevel=3,
        )

    def encode(example):
        row = encode_example(example, tokenizer, kind, text_field)
        length = len(row["input_ids"])
        if max_length is not None and length > max_length:
            kept = slice(length - max_length, None) if truncation_mode == "keep_end" else slice(None, max_length)
            row.update({key: row[key][kept] for key in MODEL_INPUT_COLUMNS})
        return {**row, "num_tokens": length}

    tokenized = dataset.map(encode, remove_columns=list(source), desc=f"Tokenizing the {role} dataset")
    merged = sum(tokenized["boundary_merged"])
    if merged:
        warnings.warn(
            f"{merged} of {len(tokenized)} rows of the {role} dataset have a token that spans the end of the prompt "
            "(e.g. a prompt ending in a space before the answer): it is trained as part of the answer, as the "
            "model reads the joined text. End prompts without a trailing space to keep the boundary exact.",
            stacklevel=3,
        )
    lengths = tokenized["num_tokens"]
    long_rows = [i for i, length in enumerate(lengths) if max_length is not None and length > max_length]
    if long_rows:
        done = {"keep_start": "were cut at the end", "keep_end": "were cut at the start (the completion kept)",
                "drop": "were dropped"}[truncation_mode]  # fmt: skip
        warnings.warn(
            f"{len(long_rows)} of {len(lengths)} rows of the {role} dataset are longer than max_length={max_length} "
            f"tokens (longest: {max(lengths)}) and {done} (truncation_mode={truncation_mode!r}). Raise max_length "
            "if the cut part matters.",
            stacklevel=3,
        )
    if long_rows and truncation_mode == "drop":
        long_set = set(long_rows)
        tokenized = tokenized.select([i for i in range(len(lengths)) if i not in long_set])
    return tokenized.remove_columns(["num_tokens", "boundary_merged"])


def check_raw_values(dataset, kind: str, columns, role: str, text_field: str = "text") -> None:
    """Every raw value has the type its format needs: text where text is read (a null or a number would reach the
    tokenizer as a raw error, or be rendered as "None"), a list of messages where a conversation is, and prompt and
    completion of the same kind. The error names the first bad row and column."""
    wanted = {column: list if kind == "conversational" else None for column in columns}
    if kind == "prompt_completion":
        first = dataset[0]["prompt"] if len(dataset) else ""
        wanted = dict.fromkeys(columns, list if isinstance(first, list) else str)
    for column, expected in wanted.items():
        expected = expected or str
        for row, value in enumerate(dataset[column]):
            if isinstance(value, expected):
                continue
            if value is None:
                _refuse_mixed_formats(dataset, row, kind, role, text_field)
            shown = "null" if value is None else f"{type(value).__name__} {value!r:.40}"
            need = "a list of messages" if expected is list else "a string"
            pair = "; prompt and completion must be both text or both messages" if kind == "prompt_completion" else ""
            stored = getattr(dataset.features.get(column), "dtype", None)
            typed = (
                f"; the file stores the column as {stored}" if stored not in (None, "string", "large_string") else ""
            )
            raise ValueError(
                f"Row {row} of the {role} dataset has {shown} in column {column!r}, which must be {need} "
                f"(the {kind} format{pair}{typed}). Fix or drop that row (dataset.filter)."
            )


def _refuse_mixed_formats(dataset, row: int, kind: str, role: str, text_field: str = "text") -> None:
    """A null in the format's column where the row fills another format's columns: the file mixes formats (their
    loaders merge the columns of every row, filling the gaps with nulls)."""
    formats = {**FORMAT_COLUMNS, "language_modeling": (text_field,)}
    example = dataset[row]
    if any(example.get(column) is not None for column in formats[kind]):
        return  # a row of this format with one value missing, not a row of another format
    for other, columns in formats.items():
        if other != kind and all(example.get(column) is not None for column in columns):
            raise ValueError(
                f"The {role} dataset mixes formats: row {row} is a {other} row ({', '.join(map(repr, columns))}) "
                f"among {kind} rows. Use one format per file (convert the rows, or split them into files)."
            )


def raw_format(dataset, role: str, text_field: str = "text") -> str:
    """The format of a raw ``role`` dataset (see :func:`dataset_format`); the error names the split."""
    try:
        return dataset_format(dataset.column_names, text_field)
    except ValueError as error:
        raise ValueError(f"The {role} dataset {error}") from None


def prepare_split(
    dataset, role: str, tokenizer, max_length: int | None, text_field: str = "text", truncation_mode: str = "keep_start"
):
    """``dataset`` unchanged when it is already tokenized (has ``input_ids``), else tokenized."""
    if not is_raw(dataset):
        return dataset
    return tokenize_dataset(dataset, tokenizer, max_length, role, text_field, truncation_mode)


def is_raw(dataset) -> bool:
    """Rows still to tokenize: a dataset without ``input_ids``."""
    return dataset is not None and "input_ids" not in dataset.column_names
