"""Validation of Beam pipeline options before a job is submitted.

Beam parses only the flags its registered `PipelineOptions` classes know and *ignores*
the rest (a misspelled ``--temp_locaton`` silently falls back to the default), and a
runner discovers missing settings late: on Dataflow after staging the job, on a Dask
cluster only once the workers run. `validate_pipeline_args` turns both into a
`ValueError` that names the flag, before any work starts:

- every flag must belong to a registered options class (a Dask flag is known once
  ``apache_beam.runners.dask.dask_runner`` is importable, i.e. with ``apache-beam[dask]``);
- the runner must be one Beam knows by name (``DirectRunner``, ``DataflowRunner``,
  ``FlinkRunner``, ``SparkRunner``, ...) or an importable ``module.Class``;
- runner-specific requirements:

  ========  ===============================================================
  Dataflow  ``--project``, ``--region``, ``--temp_location=gs://...``, and the
            job's input and output paths on ``gs://`` (workers cannot read or
            write the submitting machine's disk)
  Flink     ``--flink_master`` (else Beam starts an embedded Flink cluster)
  Spark     ``--spark_master_url`` (else Beam runs Spark in local mode)
  Dask      ``--dask_client_address`` or ``--dask_scheduler_file`` (else the
            DaskRunner starts a throw-away cluster inside the submitting process)
  ========  ===============================================================
"""

from __future__ import annotations

import argparse
import difflib
import importlib
from typing import Dict, List, Mapping, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, _BeamArgumentParser

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
_DASK_MODULE = "apache_beam.runners.dask.dask_runner"

# Lower-cased short name -> fully qualified class, as `apache_beam.runners.runner.create_runner`
# resolves them (it also accepts the name without the "Runner" suffix).
_KNOWN_RUNNERS: Dict[str, str] = {
    path.rsplit(".", 1)[-1].lower(): path for path in StandardOptions.ALL_KNOWN_RUNNERS}

# Runner family -> flags that must be given explicitly (any one of a tuple suffices).
_REQUIRED_FLAGS: Dict[str, Sequence[Sequence[str]]] = {
    "dataflow": (("project",), ("region",), ("temp_location",)),
    "flink": (("flink_master",),),
    "spark": (("spark_master_url",),),
    "dask": (("dask_client_address", "dask_scheduler_file"),),
}


# Flag prefix -> the only runner family that reads those flags.
_RUNNER_FLAG_PREFIXES = {"--dask": "dask", "--flink": "flink", "--spark": "spark"}


class _RaisingParser(_BeamArgumentParser):
    """Beam's parser, raising instead of exiting the process on a malformed value."""

    def error(self, message):
        raise ValueError(f"Invalid Beam pipeline option: {message}")


def _wants_dask(flags: Sequence[str]) -> bool:
    """A ``--dask_*`` flag, or a ``--runner`` naming a Dask runner (not any value mentioning dask)."""
    flags = list(flags)
    for i, flag in enumerate(flags):
        name, eq, value = flag.partition("=")
        if name.lower().startswith("--dask"):
            return True
        if name == "--runner" and not eq and i + 1 < len(flags):
            value = flags[i + 1]
        if name == "--runner" and "dask" in value.lower():
            return True
    return False


def _parser(flags: Sequence[str]) -> argparse.ArgumentParser:
    """A parser holding every registered options class (Dask's when it is asked for)."""
    if _wants_dask(flags):
        try:
            importlib.import_module(_DASK_MODULE)  # registers DaskOptions
        except ImportError as err:
            raise ValueError("Dask pipeline options need the Dask runner: install recfunnel[dask] "
                             f"(apache-beam[dask]). Import failed: {err}") from None
    parser = _RaisingParser(allow_abbrev=False)
    classes: Dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser


def _unknown_flags(unknown: Sequence[str]) -> List[str]:
    """The flags among argparse's leftovers (a bare value after an unknown flag is its value)."""
    names, previous_was_flag = [], False
    for token in unknown:
        if token.startswith("-"):
            names.append(token)
            previous_was_flag = "=" not in token
        elif not previous_was_flag:
            names.append(token)
        else:
            previous_was_flag = False
    return names


def _explicit_options(parser: argparse.ArgumentParser, flags: Sequence[str]) -> Dict[str, object]:
    """``{dest: value}`` of the options the flags set (defaults left out).

    Every default becomes None (what repeatable flags such as ``--experiments`` start a
    list from), so an option left at None was not given.
    """
    dests = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}  # pylint: disable=protected-access
    parser.set_defaults(**dict.fromkeys(dests))
    known, _ = parser.parse_known_args(list(flags))
    return {k: v for k, v in vars(known).items() if v is not None}


def _flag_of_dest(parser: argparse.ArgumentParser, name: str) -> str:
    """The dest of flag ``--name`` (Dask's flags store under other names)."""
    for action in parser._actions:  # pylint: disable=protected-access
        if f"--{name}" in action.option_strings:
            return action.dest
    return name


def resolve_runner(runner: Optional[str]) -> str:
    """The fully qualified class name of a ``--runner`` value (None: the DirectRunner).

    Raises:
      ValueError: Beam does not know the name and it is not an importable
        ``module.Class``.
    """
    if runner is None:
        return _KNOWN_RUNNERS["directrunner"]
    key = runner.lower()
    if key in _KNOWN_RUNNERS or key + "runner" in _KNOWN_RUNNERS:
        return _KNOWN_RUNNERS.get(key, _KNOWN_RUNNERS.get(key + "runner"))
    known = sorted(StandardOptions.KNOWN_RUNNER_NAMES)
    if "." not in runner:
        close = difflib.get_close_matches(runner, known, n=1)
        hint = (f" For Dask use --runner={DASK_RUNNER}." if "dask" in key
                else f" Did you mean {close[0]}?" if close else "")
        raise ValueError(f"Unknown Beam runner: --runner={runner}. Known runners: {', '.join(known)}, "
                         f"or the fully qualified name of a runner class.{hint}")
    module, name = runner.rsplit(".", 1)
    try:
        getattr(importlib.import_module(module), name)
    except ImportError as err:
        extra = " (install recfunnel[dask])" if "dask" in module else ""
        raise ValueError(f"Cannot import the Beam runner --runner={runner}{extra}: {err}") from None
    except AttributeError:
        raise ValueError(f"Unknown Beam runner: --runner={runner}: module {module} has no {name}.") from None
    return runner


def runner_family(runner_path: str) -> str:
    """``dataflow``, ``flink``, ``spark``, ``dask``, ``direct`` or ``other`` for a runner class."""
    name = runner_path.rsplit(".", 1)[-1].lower()
    for family in ("dataflow", "flink", "spark", "dask", "direct"):
        if family in name:
            return family
    return "other"


def validate_pipeline_args(pipeline_args: Sequence[str],
                           paths: Optional[Mapping[str, str]] = None) -> PipelineOptions:
    """Parses Beam flags, rejecting what Beam would ignore or what the runner lacks.

    Args:
      pipeline_args: Beam flags, e.g. ``["--runner=DataflowRunner", "--project=p", ...]``.
      paths: the job's input/output locations by argument name (e.g.
        ``{"data_dir": ..., "output_dir": ...}``); on Dataflow they must be ``gs://``.

    Returns:
      The `PipelineOptions` of `pipeline_args`.

    Raises:
      TypeError: `pipeline_args` is a single string.
      ValueError: a flag Beam does not know, a malformed value, an unknown runner, or a
        missing runner-specific setting; the message names the flag.
    """
    if isinstance(pipeline_args, (str, bytes)):
        raise TypeError("`pipeline_args` should be a sequence of flags, not one string. "
                        f"Received: pipeline_args={pipeline_args!r}")
    flags = [str(f) for f in pipeline_args]
    parser = _parser(flags)
    _, unknown = parser.parse_known_args(flags)
    unknown_flags = _unknown_flags(unknown)
    if unknown_flags:
        known = [s for a in parser._actions for s in a.option_strings]  # pylint: disable=protected-access
        hints = []
        for flag in unknown_flags:
            close = difflib.get_close_matches(flag.split("=", 1)[0], known, n=1)
            hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
        raise ValueError(f"Beam does not know the pipeline option(s) {', '.join(hints)}; Beam would ignore "
                         "them. Check the spelling, or install the extra that defines them "
                         "(e.g. recfunnel[dask] for --dask_* flags).")
    given = _explicit_options(parser, flags)
    runner = resolve_runner(given.get("runner"))
    family = runner_family(runner)
    for flag in flags:
        prefix = flag.split("_", 1)[0]
        if prefix in _RUNNER_FLAG_PREFIXES and _RUNNER_FLAG_PREFIXES[prefix] != family:
            raise ValueError(f"{flag.split('=', 1)[0]} is an option of the "
                             f"{_RUNNER_FLAG_PREFIXES[prefix].capitalize()}Runner only, and the runner is "
                             f"{runner.rsplit('.', 1)[-1]}; Beam would ignore it.")
    missing = []
    for alternatives in _REQUIRED_FLAGS.get(family, ()):
        if not any(given.get(_flag_of_dest(parser, name)) not in (None, "") for name in alternatives):
            missing.append(" or ".join(f"--{name}" for name in alternatives))
    short = runner.rsplit(".", 1)[-1]
    if missing:
        raise ValueError(f"{short} needs {', '.join(missing)}. Received: {flags}")
    if family == "dataflow":
        temp = str(given["temp_location"])
        if not temp.startswith("gs://"):
            raise ValueError(f"{short} needs --temp_location on Cloud Storage (gs://...). "
                             f"Received: --temp_location={temp}")
        staging = given.get("staging_location")
        if staging is not None and not str(staging).startswith("gs://"):
            raise ValueError(f"{short} needs --staging_location on Cloud Storage (gs://...). "
                             f"Received: --staging_location={staging}")
        for name, path in (paths or {}).items():
            if not str(path).startswith("gs://"):
                raise ValueError(f"On {short} the workers read and write `{name}`, so it should be a "
                                 f"gs:// path. Received: {name}={path!r}")
    return PipelineOptions(flags)
