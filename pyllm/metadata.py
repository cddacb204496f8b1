"""The metadata JSON of a parameters file: parsed with bounds, every field any module reads
checked for type and range, once (format.read calls parse and validate). After this the
rest of the code trusts the types; an error names the key:

    metadata key tokenizer.eot_token_id: expected an int in 0..49151, got a list

What is read, and by whom (absent keys are allowed where a default exists):
  config          an object; values anything (printed by `pyllm info`); arch and
                  architecture strings (bench). Header fields override same-named keys.
  tokenizer       an object (tokenizer.py, model.py, chat.py, `pyllm info`):
                    model str, pre str|null, tokens [str] (one per vocabulary row),
                    token_type [int 0..6], scores [number, not NaN], merges [str | [str, str]]
                    (required by the gpt2 model), *_token_id int in the vocabulary or null,
                    add_bos_token / add_eos_token / add_space_prefix bool|null
  chat_template   str|null (chat.py, `pyllm info`)
  provenance      an object or null (`pyllm info`)
  tensors         [{name, dtype, shape, offset}], exactly the canonical layout and the
                  table's offsets (bench, `pyllm info`)
"""

import json
import math

MAX_BYTES = 32 << 20  # the largest real vocabularies (256k tokens with merges) need under 16 MiB
MAX_DEPTH = 32  # real metadata nests 4 deep (tokenizer.merges[i][j])
MAX_TOKEN_TYPE = 6  # GGUF's token types: 0 undefined .. 6 byte
_CONTAINERS = frozenset((list, dict))
FLAGS = ("add_bos_token", "add_eos_token", "add_space_prefix")


class MetadataError(ValueError):
    """The metadata JSON is unreadable or a field has the wrong type or range (format.read
    raises it as format.MetadataError, a FormatError, with the file's name)."""


def _kind(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        r = repr(v)
        return r if len(r) <= 24 else "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _fail(key, expected, v):
    raise MetadataError(f"metadata key {key}: expected {expected}, got {_kind(v)}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse(data):
    """bytes -> the metadata object; MetadataError if too large, not UTF-8 JSON, or too deep."""
    if len(data) > MAX_BYTES:
        raise MetadataError(
            f"metadata is {len(data)} bytes, more than the {MAX_BYTES >> 20} MiB pyllm reads"
        )
    try:
        meta = json.loads(data.decode())
    except (
        UnicodeDecodeError,
        ValueError,
    ) as e:  # ValueError: JSONDecodeError, an int of 5000 digits
        raise MetadataError(f"corrupt metadata ({str(e)[:200]})") from None
    except RecursionError:
        raise MetadataError(f"metadata nests deeper than {MAX_DEPTH} levels") from None
    except MemoryError:
        raise MetadataError("metadata too large to parse in the memory available") from None
    stack = [(meta, 1)]  # depth without recursion
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise MetadataError(f"metadata nests deeper than {MAX_DEPTH} levels")
        if type(v) not in _CONTAINERS:  # the document itself may be a scalar
            continue
        items = v.values() if isinstance(v, dict) else v
        if not _CONTAINERS.isdisjoint(map(type, items)):  # (a C-speed look at a vocabulary)
            stack.extend((x, depth + 1) for x in items if type(x) in _CONTAINERS)
    return meta


def _list_of(key, v, n, check, item, items, fast=None):
    """v is a list of n items (n None: any number) each passing check; fast(v), if given,
    accepts the whole list at C speed (vocabularies are long), else each item is checked."""
    if not isinstance(v, list) or (n is not None and len(v) != n):
        _fail(key, f"a list of {n} {items}" if n is not None else f"a list of {items}", v)
    if fast is not None and fast(v):
        return
    for i, x in enumerate(v):
        if not check(x):
            _fail(f"{key}[{i}]", item, x)


def _types(v):
    return set(map(type, v))  # exact types: JSON gives no subclasses, and bool is not int here


def _is_merge(m):
    return isinstance(m, str) or (
        isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)
    )


def _tokenizer(tok, vocab_size):
    if not isinstance(tok, dict):
        _fail("tokenizer", "an object", tok)
    if not isinstance(tok.get("model"), str):
        _fail("tokenizer.model", "a string", tok.get("model"))
    if tok.get("pre") is not None and not isinstance(tok["pre"], str):
        _fail("tokenizer.pre", "a string or null", tok["pre"])
    _list_of(
        "tokenizer.tokens",
        tok.get("tokens"),
        vocab_size,
        lambda t: isinstance(t, str),
        "a string",
        "strings",
        fast=lambda v: _types(v) <= {str},
    )
    if tok.get("token_type") is not None:
        _list_of(
            "tokenizer.token_type",
            tok["token_type"],
            vocab_size,
            lambda t: _is_int(t) and 0 <= t <= MAX_TOKEN_TYPE,
            f"an int in 0..{MAX_TOKEN_TYPE}",
            f"ints in 0..{MAX_TOKEN_TYPE}",
            fast=lambda v: (
                _types(v) <= {int} and (not v or 0 <= min(v) <= max(v) <= MAX_TOKEN_TYPE)
            ),
        )
    if tok.get("scores") is not None:
        _list_of(
            "tokenizer.scores",
            tok["scores"],
            vocab_size,
            lambda s: _is_number(s) and not math.isnan(s),
            "a number (not NaN)",
            "numbers",
            fast=lambda v: _types(v) <= {int, float} and not any(map(math.isnan, v)),
        )
    if tok.get("merges") is not None or tok["model"] == "gpt2":
        _list_of(
            "tokenizer.merges",
            tok.get("merges"),
            None,
            _is_merge,
            "a string 'left right' or a pair of strings",
            "merges",
            fast=lambda v: _types(v) <= {str},
        )
    for key, v in tok.items():
        if key.endswith("_token_id") and v is not None and not (_is_int(v) and 0 <= v < vocab_size):
            _fail(f"tokenizer.{key}", f"an int in 0..{vocab_size - 1}", v)
        elif key in FLAGS and v is not None and not isinstance(v, bool):
            _fail(f"tokenizer.{key}", "true, false or null", v)


def _tensors(entries, layout, table):
    """The tensor list must be the canonical layout with the table's offsets."""
    if not isinstance(entries, list) or len(entries) != len(layout):
        _fail("tensors", f"a list of {len(layout)} tensors", entries)
    for i, (e, (name, shape, dtype), (offset, _)) in enumerate(zip(entries, layout, table)):
        key = f"tensors[{i}]"
        if not isinstance(e, dict):
            _fail(key, "an object", e)
        for field, want in (
            ("name", name),
            ("dtype", dtype),
            ("shape", list(shape)),
            ("offset", offset),
        ):
            v = e.get(field)
            # == alone would take 2.0 for 2 and True for 1
            same = (
                v == want
                and (field != "offset" or _is_int(v))
                and (field != "shape" or all(_is_int(x) for x in v))
            )
            if not same:
                shown = f"{want!r}" if field != "shape" else f"[{', '.join(map(str, want))}]"
                _fail(f"{key}.{field}", shown, v)


def validate(meta, vocab_size, layout, table):
    """Check every field read anywhere. From the (checked) header: vocab_size, layout (the
    canonical [(name, shape, dtype)], format.tensor_layout) and table [(offset, nbytes)]."""
    if not isinstance(meta, dict):
        _fail("(top level)", "an object", meta)
    config = meta.get("config", {})
    if not isinstance(config, dict):
        _fail("config", "an object", config)
    for key in ("arch", "architecture", "name"):
        if config.get(key) is not None and not isinstance(config[key], str):
            _fail(f"config.{key}", "a string", config[key])
    _tokenizer(meta.get("tokenizer"), vocab_size)
    if meta.get("chat_template") is not None and not isinstance(meta["chat_template"], str):
        _fail("chat_template", "a string or null", meta["chat_template"])
    if meta.get("provenance") is not None and not isinstance(meta["provenance"], dict):
        _fail("provenance", "an object or null", meta["provenance"])
    _tensors(meta.get("tensors"), layout, table)
    return meta
