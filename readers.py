"""Reading input files, streamed, with errors that name the file and the line (used by data.py and sft.py).

    read_lines(path)            (line number, text) of a plain or gzip file, with a progress bar
    read_jsonl(path)            (line number, dict) of a JSON-lines file
    read_rows(path, sep)        (line number, fields) of a delimited file
    read_atomic(path, required) (line number, {column: value}) of a RecBole atomic file
"""
import gzip
import json
import os
import zlib

from tqdm import tqdm


class DataError(Exception):
    """Bad input; the message names the file and, when there is one, the line."""


def read_lines(path, encoding="utf-8"):
    """Yield (line_number, text) of a plain or gzip file, streamed, with a tqdm bar over its bytes."""
    try:
        raw = open(path, "rb")
        is_gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror})") from None
    lineno = 0
    bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=os.path.basename(path),
               disable=None, leave=False)
    with raw, bar:
        try:
            for lineno, line in enumerate(gzip.GzipFile(fileobj=raw) if is_gzip else raw, 1):
                if lineno % 8192 == 0:
                    bar.update(raw.tell() - bar.n)
                try:
                    text = line.decode(encoding)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid {encoding} (byte {e.start + 1})") from None
                yield lineno, text.rstrip("\r\n")
        except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip
            raise DataError(f"{path}:{lineno + 1}: cannot read ({e})") from None


def read_jsonl(path):
    """Yield (line_number, dict) for each non-blank line of a JSON-lines file."""
    for lineno, text in read_lines(path):
        if text.strip():
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def read_rows(path, sep, count=None, encoding="utf-8"):
    """Yield (line_number, fields) of a delimited file; each row has `count` fields (default: as many
    as the first row)."""
    for lineno, text in read_lines(path, encoding):
        if text.strip():
            values = text.split(sep)
            count = count or len(values)
            if len(values) != count:
                raise DataError(f"{path}:{lineno}: expected {count} fields split by {sep!r}, got {len(values)}")
            yield lineno, values


def read_atomic(path, required):
    """Yield (line_number, {column: value}) of a RecBole atomic file (tab-separated, "name:type" header)."""
    rows = read_rows(path, "\t")
    columns = [name.split(":")[0] for name in next(rows, (1, []))[1]]
    missing = [name for name in required if name not in columns]
    if missing:
        raise DataError(f"{path}:1: the header lacks column(s) {', '.join(missing)}")
    for lineno, values in rows:
        yield lineno, dict(zip(columns, values))


def require(record, name, kinds, path, lineno):
    value = record.get(name)
    if value is None:
        raise DataError(f"{path}:{lineno}: missing required field '{name}'")
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DataError(f"{path}:{lineno}: field '{name}' has the wrong type ({type(value).__name__})")
    return value


def as_int(text, path, lineno):
    try:
        return int(float(text))
    except ValueError:
        raise DataError(f"{path}:{lineno}: not a number: {text!r}") from None
