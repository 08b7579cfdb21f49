"""What an evaluation runs a trained method from: what --model is a checkpoint of, which of --methods
it can serve, and each trained method's trace settings (its training's, unless given on the command
line). evaluate.py runs the methods.
"""
import dataclasses
import json
import os
import shlex

import data
from protocol import UsageError
from machinery import config, models


# A trained method needs a checkpoint of its own training: what its directory holds, and its record of settings.
TRAINED_BY = {"r2rank": "a checkpoint of --stage rl with its scoring head (head.safetensors)",
              "reczero": "a checkpoint of baselines/reczero.py (reczero.json)",
              "r2ec": "a checkpoint of baselines/r2ec.py (r2ec-head.safetensors)",
              None: "not the checkpoint of a trained method (no head.safetensors, reczero.json or r2ec-head.safetensors)"}
RECORDS = {"r2rank": ("r2rank.json", "config"), "reczero": ("reczero.json", "settings"), "r2ec": ("r2ec.json", "settings")}
TRACE_SETTINGS = ("max_new_tokens", "max_history", "max_item_chars", "response_prefix", "prompt")


def chosen_settings(cfg):
    """The names of the Config fields the user chose. parse_config records those given on the command line
    as cfg.given (a default typed out counts as given); a Config built in code has no record, and there
    the fields that differ from their defaults count as chosen."""
    given = getattr(cfg, "given", None)
    if given is not None:
        return set(given)
    defaults = config.Config()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}


def checkpoint_kind(model):
    """The trained method --model is a checkpoint of, from the files it holds: r2rank, r2ec, reczero,
    or None (a hub id, tiny, a bare model, an SFT checkpoint)."""
    if models.has_head(model):
        return "r2rank"
    if os.path.isfile(os.path.join(model, "r2ec-head.safetensors")):  # baselines/r2ec.py's head (r2ec.has_head)
        return "r2ec"
    return "reczero" if os.path.isfile(os.path.join(model, "reczero.json")) else None


def servable(methods, model, named):
    """methods less the trained ones --model is no checkpoint of. One the user named in --methods is refused
    (a UsageError): reczero on an R2ec checkpoint would be reported as RecZero's. Taken from the default
    --methods (r2rank only), it is skipped with a note, so that a bare model evaluates the baselines."""
    kind = checkpoint_kind(model)
    for name in [name for name in methods if name in RECORDS and name != kind]:
        if named:
            fix = f"evaluate it with --methods {kind}" if kind else f"leave {name} out of --methods"
            raise UsageError(f"--methods {name} needs {TRAINED_BY[name]}; --model {model} is {TRAINED_BY[kind]}: {fix}")
        # only r2rank is in the default --methods
        print(f"note: {model} has no trained scoring head (head.safetensors), so r2rank is skipped: an untrained "
              f"head's scores are noise. Pass a checkpoint directory of --stage rl as --model to evaluate R2Rank.")
        methods.remove(name)
    return methods


def as_flag(setting, value):
    return f"--{setting.replace('_', '-')} " + (shlex.quote(value) if isinstance(value, str) else str(value))


def method_settings(cfg, name, chosen, others):
    """cfg for the trained method `name`: the trace settings its checkpoint was trained with (its record,
    RECORDS), but for those the user chose; one note names the settings taken, one per chosen setting that
    differs from training. others: whether other methods read the prompt (and keep cfg's settings)."""
    record, key = RECORDS[name]
    path = os.path.join(cfg.model, record)
    try:
        with open(path) as f:
            trained = json.load(f)[key]
        trained = {setting: trained[setting] for setting in TRACE_SETTINGS if setting in trained}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise data.DataError(f"{path}: cannot read the settings {name} was trained with ({error!r})") from None
    for setting, value in trained.items():
        if setting in chosen and value != getattr(cfg, setting):
            print(f"note: {name} was trained with {as_flag(setting, value)}; this evaluation uses "
                  f"{as_flag(setting, getattr(cfg, setting)).split(' ', 1)[1]}, as given")
    taken = {setting: value for setting, value in trained.items() if setting not in chosen and value != getattr(cfg, setting)}
    if taken:
        print(f"note: {name} runs with the trace settings it was trained with ({record}): "
              + ", ".join(as_flag(setting, value) for setting, value in taken.items())
              + ("; the other methods with " + ", ".join(as_flag(setting, getattr(cfg, setting)) for setting in taken)
                 if others else ""))
    return dataclasses.replace(cfg, **taken)
